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
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from performer.data import catalog

DATASETS = ('lm1b', 'imagenet64', 'uniref50', 'trembl', 'text')
_GZ_RATIO = 2.5  # rough uncompressed/gzip size ratio of protein FASTA


def _gb(n_bytes: float) -> float:
  return n_bytes / 1e9


def space_needed(args) -> dict[str, float]:
  """Estimated GB: download, prepared, scratch and total for the requested dataset."""
  if args.dataset == 'text':  # only a sentencepiece model (~1 MB) next to the file
    return {'download': 0.0, 'prepared': 0.001, 'scratch': 0.0, 'total': 0.001}
  if args.dataset in ('uniref50', 'trembl') and args.fasta:  # checked to exist
    with open(args.fasta, 'rb') as f:
      gz = f.read(2) == b'\x1f\x8b'
    prepared = _gb(os.path.getsize(args.fasta)) * (_GZ_RATIO if gz else 1.0) * 1.1
    return {'download': 0.0, 'prepared': prepared, 'scratch': 0.0, 'total': prepared}
  spec = catalog.SPECS[_tfds_key(args)]
  return {
    'download': spec.download_gb,
    'prepared': spec.prepared_gb,
    'scratch': spec.scratch_gb,
    'total': spec.total_gb,
  }


def _tfds_key(args) -> str:
  return args.variant if args.dataset == 'imagenet64' else args.dataset


def free_gb(path: str) -> float | None:
  """Free space on the file system that holds `path` (or its nearest existing parent)."""
  if '://' in path:
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return _gb(shutil.disk_usage(path).free)


def describe(args) -> str:
  need = space_needed(args)
  where = os.path.dirname(os.path.abspath(args.path)) if args.dataset == 'text' else args.data_dir
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
  if args.dataset != 'text':
    spec = catalog.SPECS[_tfds_key(args)]
    if spec.needs_tensorflow:
      lines.append(
        f"  TFDS's {spec.name} builder needs TensorFlow to prepare: "
        f"pip install 'performer-zoo[prepare]'"
      )
    if spec.note:
      lines.append(f'  note: {spec.note}')
  if free is not None and free < need['total']:
    lines.append('  WARNING: less free space than the estimate')
  return '\n'.join(lines)


def run(args) -> str:
  """Prepares the dataset; returns a one-line summary of where it is."""
  if args.dataset == 'lm1b':
    from performer.data import lm1b  # pylint: disable=g-import-not-at-top

    out = lm1b.prepare(
      args.data_dir,
      vocab_size=args.vocab_size or lm1b.DEFAULT_VOCAB_SIZE,
      spm_path=args.spm_path,
      manual_dir=args.manual_dir,
    )
    return (
      f'lm1b ready in {out["path"]}; sentencepiece model {out["spm_path"]} '
      f'({out["vocab_size"]} pieces)'
    )
  if args.dataset == 'imagenet64':
    from performer.data import imagenet64  # pylint: disable=g-import-not-at-top

    path = imagenet64.prepare(args.data_dir, variant=args.variant, manual_dir=args.manual_dir)
    return f'imagenet64 ({args.variant}) ready in {path}'
  if args.dataset in ('uniref50', 'trembl'):
    from performer.data import uniref  # pylint: disable=g-import-not-at-top

    path = uniref.prepare(
      args.dataset, args.data_dir, fasta_path=args.fasta, manual_dir=args.manual_dir
    )
    return f'{args.dataset} ready in {path}'
  from performer.data import text  # pylint: disable=g-import-not-at-top

  cfg = _Cfg(name='text', path=args.path, vocab_size=args.vocab_size, spm_path=args.spm_path)
  vocab = text.vocab_for(cfg)
  return f'text tokenizer ready: {vocab.path} ({vocab.size} pieces)'


class _Cfg:
  def __init__(self, **kwargs):
    self.__dict__.update(kwargs)


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m performer.data.prepare',
    description='Download and prepare a dataset as ArrayRecord for training.',
  )
  parser.add_argument('dataset', choices=DATASETS)
  parser.add_argument(
    '--data_dir',
    default='',
    help='TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets); '
    'pass the same value as config.data.data_dir',
  )
  parser.add_argument(
    '--variant',
    default='downsampled_imagenet',
    choices=('downsampled_imagenet', 'imagenet_resized'),
    help='imagenet64 source (config.data.variant)',
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
  parser.add_argument('--path', default='', help='text: the text file (config.data.path)')
  parser.add_argument(
    '--manual_dir', default='', help='a folder of files downloaded by hand (TFDS manual_dir)'
  )
  parser.add_argument('--dry_run', action='store_true', help='only print the space needed')
  args = parser.parse_args(argv)
  args.data_dir = catalog.data_dir_for(_Cfg(data_dir=args.data_dir))
  if args.dataset == 'text' and not args.path:
    parser.error('text needs --path FILE')
  if args.fasta and args.dataset not in ('uniref50', 'trembl'):
    parser.error('--fasta is for uniref50 / trembl')
  if args.fasta and not os.path.isfile(args.fasta):
    parser.error(f'--fasta: no such file {args.fasta!r}')
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  print(describe(args), flush=True)
  if args.dry_run:
    return 0
  try:
    print(run(args), flush=True)
  except (RuntimeError, ValueError, FileNotFoundError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
