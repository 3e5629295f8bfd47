"""UniRef50 and TrEMBL: our own TFDS builders (FASTA -> ArrayRecord) and their pipeline.

Prepare once, from the official URL or from a FASTA file you already have:

    python -m performer.data.prepare uniref50 --data_dir ~/tensorflow_datasets
    python -m performer.data.prepare uniref50 --fasta /data/uniref50.fasta.gz

The builders (``uniref50``, ``trembl``) need no TensorFlow:

* Input: the official gzipped FASTA (``URL``), or a local file found in the
  manual dir (``prepare --fasta`` links the file there). Parsed by fasta.py,
  which is strict: a malformed record is an error naming the file, line and
  record id, and preparation stops (a silently mangled corpus is worse).
* Splits: a record goes to train / validation / test (90/5/5) by an MD5 hash
  of its id (dataset.split_of, the same rule as the bundled sample), so the
  split is stable across releases for records that persist. TFDS generates
  one split per pass, so the file is read three times.
* Stored features: ``id`` and ``sequence`` (text). The sequence is already
  normalised by the protein vocabulary's rules (upper case, final '*'
  stripped, unknown letters -> X; B, O, U, X, Z kept as their own tokens).

The pipeline reads the splits through ``tfds.data_source`` and grain
(sequences.py): examples are ``[BOS] + residues + [EOS]``; training takes
random windows of seq_len (``config.data.crop='random'``) or the start,
eval takes the first seq_len tokens; ``config.data.pack=True`` packs instead.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from performer.data import catalog, fasta
from performer.data.dataset import SPLITS, split_of
from performer.data.protein import with_specials
from performer.data.vocab import PROTEIN_VOCAB, ProteinVocab

_RELEASES = 'sizes grow with each UniProt release'
SPECS = {
  'uniref50': catalog.Spec('uniref50', SPLITS, 12.0, 20.0, note=_RELEASES),
  'trembl': catalog.Spec('trembl', SPLITS, 60.0, 110.0, note=_RELEASES),
}
_GZ_RATIO = 2.5  # rough uncompressed/gzip size ratio of protein FASTA
FASTA_SUFFIXES = ('.fasta', '.fasta.gz', '.fa', '.fa.gz', '.faa', '.faa.gz', '.fas', '.fas.gz')


class _FastaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared FASTA -> ArrayRecord builder; subclasses set URL and FILE_NAMES."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: id + normalised sequence, 90/5/5 hash split.'}
  URL = ''
  FILE_NAMES: tuple[str, ...] = ()
  HOMEPAGE = 'https://www.uniprot.org/help/downloads'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Optional: put the FASTA file (plain or .gz) in the manual dir, or run '
    '`python -m performer.data.prepare <name> --fasta PATH`; without it the '
    'official file is downloaded.'
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'Protein sequences from {self.URL}, split 90/5/5 by a hash of the id.',
      features=tfds.features.FeaturesDict(
        {'id': tfds.features.Text(), 'sequence': tfds.features.Text()}
      ),
      homepage=self.HOMEPAGE,
    )

  def _local_fasta(self, dl_manager):
    """The FASTA file in the manual dir, or None to download."""
    try:
      manual = dl_manager.manual_dir
    except (AssertionError, ValueError):  # no manual dir, or it is empty
      return None
    for name in self.FILE_NAMES:
      if (manual / name).exists():
        return manual / name
    found = sorted(p for p in manual.iterdir() if p.name.lower().endswith(FASTA_SUFFIXES))
    if len(found) > 1:
      raise ValueError(
        f'{manual}: several FASTA files ({", ".join(p.name for p in found)}); '
        f'keep one, or name it {self.FILE_NAMES[0]}'
      )
    return found[0] if found else None

  def _split_generators(self, dl_manager):
    path = self._local_fasta(dl_manager) or dl_manager.download(self.URL)
    return {split: self._generate_examples(os.fspath(path), split) for split in SPLITS}

  def _generate_examples(self, path: str, split: str):
    for index, (record_id, _, sequence) in enumerate(fasta.parse_fasta(path)):
      if split_of(record_id) == split:
        yield index, {'id': record_id, 'sequence': sequence}


class Uniref50(_FastaBuilder):
  """UniRef50 clusters' representative sequences (the Performer paper's protein set)."""

  URL = 'https://ftp.uniprot.org/pub/databases/uniprot/uniref/uniref50/uniref50.fasta.gz'
  FILE_NAMES = ('uniref50.fasta.gz', 'uniref50.fasta')


class Trembl(_FastaBuilder):
  """UniProtKB/TrEMBL, the unreviewed sequences (the paper's larger protein set)."""

  URL = (
    'https://ftp.uniprot.org/pub/databases/uniprot/current_release/knowledgebase/'
    'complete/uniprot_trembl.fasta.gz'
  )
  FILE_NAMES = (
    'uniprot_trembl.fasta.gz',
    'uniprot_trembl.fasta',
    'trembl.fasta.gz',
    'trembl.fasta',
  )


BUILDERS = {'uniref50': Uniref50, 'trembl': Trembl}


def _record_tokens(record) -> np.ndarray:
  return with_specials(PROTEIN_VOCAB.encode_array(record['sequence']))


class UniprotFasta(catalog.Prepared):
  """uniref50 or trembl, prepared by its builder above."""

  prepare_flags = ('fasta',)

  def __init__(self, name: str):
    self.name = name  # a key of BUILDERS and SPECS

  def spec(self, cfg) -> catalog.Spec:
    del cfg
    return SPECS[self.name]

  def vocab(self, cfg) -> ProteinVocab:
    """The protein vocabulary; checks first that the dataset is prepared, so a training
    run without the data stops before it builds the model."""
    self.require(cfg)
    return PROTEIN_VOCAB

  def encoder(self, cfg):
    self.require(cfg)
    return _record_tokens

  def space_gb(self, cfg) -> dict[str, float]:
    """The spec's estimate, or from the size of a local FASTA given with --fasta."""
    path = getattr(cfg, 'fasta', '') or ''
    if not path:
      return super().space_gb(cfg)
    with open(path, 'rb') as f:
      gz = f.read(2) == b'\x1f\x8b'
    prepared = os.path.getsize(path) / 1e9 * (_GZ_RATIO if gz else 1.0) * 1.1
    return {'download': 0.0, 'prepared': prepared, 'scratch': 0.0, 'total': prepared}

  def prepare(self, cfg) -> str:
    path = prepare(
      self.name, catalog.data_dir_for(cfg), fasta_path=cfg.fasta, manual_dir=cfg.manual_dir
    )
    return f'{self.name} ready in {path}'


UNIREF50 = UniprotFasta('uniref50')
TREMBL = UniprotFasta('trembl')


def _stage_fasta(name: str, fasta_path: str, data_dir: str) -> str:
  """A manual dir holding only a link to the user's file (under the canonical name)."""
  src = os.path.abspath(os.path.expanduser(fasta_path))
  if not os.path.isfile(src):
    raise FileNotFoundError(f'FASTA file not found: {src!r}')
  with open(src, 'rb') as f:
    gz = f.read(2) == b'\x1f\x8b'
  stage = os.path.join(data_dir, 'downloads', 'manual', name)
  os.makedirs(stage, exist_ok=True)
  for old in os.listdir(stage):
    os.remove(os.path.join(stage, old))
  link = os.path.join(stage, f'{name}.fasta' + ('.gz' if gz else ''))
  try:
    os.symlink(src, link)
  except OSError:  # no symlinks (some file systems): hard link or copy
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.copyfile(src, link)
  return stage


def prepare(name: str, data_dir: str, *, fasta_path: str = '', manual_dir: str = '') -> str:
  """Prepares `name` ('uniref50' | 'trembl') as ArrayRecord under data_dir; returns its dir.

  `fasta_path`: a local FASTA (plain or gzip) to use instead of downloading.
  """
  if name not in BUILDERS:
    raise ValueError(f'unknown protein dataset {name!r}; choose from {tuple(BUILDERS)}')
  found = catalog.find_prepared(name, data_dir, SPLITS)
  if found:
    return found
  if fasta_path:
    manual_dir = _stage_fasta(name, fasta_path, data_dir)
  builder = BUILDERS[name](data_dir=data_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir or None, try_download_gcs=False)
  builder.download_and_prepare(download_config=config, file_format='array_record')
  return catalog.require_prepared(name, SPECS[name], data_dir)
