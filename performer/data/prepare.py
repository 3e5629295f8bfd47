r"""Prepare a dataset once, before training: ``python -m performer.data.prepare <dataset>``.

    python -m performer.data.prepare lm1b        [--data_dir DIR] [--vocab_size 30000]
    python -m performer.data.prepare imagenet64  [--data_dir DIR] [--variant imagenet_resized]
    python -m performer.data.prepare uniref50    [--data_dir DIR] [--fasta uniref50.fasta.gz]
    python -m performer.data.prepare trembl      [--data_dir DIR] [--fasta uniprot_trembl.fasta.gz]
    python -m performer.data.prepare text --path corpus.txt [--vocab_size 8000]

It first prints the disk space the dataset will need (estimates; UniProt files
grow every release) and the space free under the data dir, then downloads and
writes ArrayRecord files under ``<data_dir>/<tfds name>/<version>/`` (TFDS's
layout; data_dir defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets, the same
rule training uses). ``--dry_run`` only prints. Running it again on a prepared
dataset does nothing.

TensorFlow: the TFDS catalog builders for lm1b, downsampled_imagenet and
imagenet_resized need it to *generate* (pip install 'performer-zoo[prepare]');
uniref50, trembl and text do not, and training never does.

Every name of the data registry (performer.data.REGISTRY) is accepted: each dataset
prepares itself (Dataset.prepare; for data already on disk, checking the file and
building its vocabulary), so nothing here depends on which dataset it is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import types

from performer import data
from performer.data import catalog

# Flags a dataset reads only if it lists them in Dataset.prepare_flags.
_DATASET_FLAGS = ('variant', 'vocab_size', 'spm_path', 'fasta')


def _gb(n_bytes: float) -> float:
  return n_bytes / 1e9


def free_gb(path: str) -> float | None:
  """Free space on the file system that holds `path` (or its nearest existing parent)."""
  if '://' in path:
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return _gb(shutil.disk_usage(path).free)


def _config(args) -> types.SimpleNamespace:
  """The config.data stand-in the dataset reads (prepare runs without a config file):
  the command's options under their config.data names, and `name`."""
  return types.SimpleNamespace(**vars(args), name=args.dataset)


def space_needed(args) -> dict[str, float]:
  """Estimated GB: download, prepared, scratch and total for the requested dataset."""
  cfg = _config(args)
  return data.dataset_for(cfg).space_gb(cfg)


def describe(args) -> str:
  cfg = _config(args)
  dataset = data.dataset_for(cfg)
  need = dataset.space_gb(cfg)
  where = os.path.dirname(os.path.abspath(args.path)) if dataset.needs_path else args.data_dir
  free = free_gb(where)
  lines = [
    f'{args.dataset}: needs about {need["total"]:.1f} GB of disk under {where}'
    + (f' (free now: {free:.1f} GB)' if free is not None else '')
  ]
  if need['download'] or need['scratch']:
    lines.append(
      f'  download ~{need["download"]:.1f} GB, prepared ArrayRecord '
      f'~{need["prepared"]:.1f} GB, temporary extraction ~{need["scratch"]:.1f} GB'
    )
  spec = dataset.spec(cfg)
  if spec is not None and spec.needs_tensorflow:
    lines.append(
      f"  TFDS's {spec.name} builder needs TensorFlow to prepare: "
      f"pip install 'performer-zoo[prepare]'"
    )
  if spec is not None and spec.note:
    lines.append(f'  note: {spec.note}')
  if free is not None and free < need['total']:
    lines.append('  WARNING: less free space than the estimate')
  return '\n'.join(lines)


def run(args) -> str:
  """Prepares the dataset; returns a one-line summary of where it is."""
  cfg = _config(args)
  return data.dataset_for(cfg).prepare(cfg)


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m performer.data.prepare',
    description='Download and prepare a dataset as ArrayRecord for training.',
  )
  parser.add_argument('dataset', choices=data.NAMES)
  parser.add_argument(
    '--data_dir',
    default='',
    help='TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets); '
    'pass the same value as config.data.data_dir',
  )
  parser.add_argument(
    '--variant',
    default='',
    help='imagenet64 source (config.data.variant): downsampled_imagenet (default) or '
    'imagenet_resized',
  )
  parser.add_argument(
    '--vocab_size',
    type=int,
    default=0,
    help='sentencepiece size (config.data.vocab_size); lm1b 30000, text 8000',
  )
  parser.add_argument('--spm_path', default='', help='where to write the sentencepiece model')
  parser.add_argument(
    '--fasta',
    default='',
    help='uniref50/trembl: a local FASTA (.gz ok) to use instead of downloading',
  )
  parser.add_argument('--path', default='', help='text, fasta: the local file (config.data.path)')
  parser.add_argument(
    '--manual_dir', default='', help='a folder of files downloaded by hand (TFDS manual_dir)'
  )
  parser.add_argument('--dry_run', action='store_true', help='only print the space needed')
  args = parser.parse_args(argv)
  args.data_dir = catalog.data_dir_for(types.SimpleNamespace(data_dir=args.data_dir))
  dataset = data.dataset_for(types.SimpleNamespace(name=args.dataset))
  if dataset.needs_path and not args.path:
    parser.error(f'{args.dataset} needs --path FILE')
  for flag in _DATASET_FLAGS:
    if getattr(args, flag) != parser.get_default(flag) and flag not in dataset.prepare_flags:
      parser.error(f'--{flag} is not an option of {args.dataset}')
  if args.fasta and not os.path.isfile(args.fasta):
    parser.error(f'--fasta: no such file {args.fasta!r}')
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    print(describe(args), flush=True)
    if not args.dry_run:
      print(run(args), flush=True)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    # a value or file the user named: 2; the environment (no TensorFlow, a download): 1
    return 1 if isinstance(e, RuntimeError) else 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
