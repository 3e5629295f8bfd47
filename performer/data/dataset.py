"""The one protocol every dataset implements, and the names all of them share.

Why: training, eval, sampling and `prepare` talk to any dataset through the same few
calls, so they never branch on `config.data.name`; the registry in
``performer/data/__init__.py`` maps each name to an object of this class.

A dataset says where its examples come from (:meth:`Dataset.source`, a random-access
sequence of records), how a record becomes tokens (:meth:`Dataset.encoder`) and what its
vocabulary is; the shared grain pipeline (sequences.py) does the cropping, packing,
batching and eval padding for all of them. The rest has a default: no file check, no
preparation beyond the vocabulary, no unigram baseline, no word counts.

This module imports nothing heavy (no grain, no TFDS), so `import performer.data` stays
cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterator

import numpy as np

from performer import errors

SPLITS = ('train', 'validation', 'test')
CROPS = ('random', 'start')  # config.data.crop: a training window at a random offset, or the start
# Cumulative percent boundaries of the hash split: [0, 90) train, [90, 95) validation, ...
_SPLIT_BOUNDS = {'train': (0, 90), 'validation': (90, 95), 'test': (95, 100)}


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')


def split_of(key: str) -> str:
  """The 90/5/5 split of a record (a protein id, a line of text) from an MD5 hash of
  `key` (never Python's hash()), so it never changes when a file is reordered or grows."""
  bucket = int.from_bytes(hashlib.md5(key.encode('utf-8')).digest()[:8], 'big') % 100
  return next(s for s, (lo, hi) in _SPLIT_BOUNDS.items() if lo <= bucket < hi)


def user_file(cfg, what: str, short: str) -> str:
  """config.data.path, absolute, for a dataset that reads the user's own file: a
  UserInputError when it is unset, a DataFileError when missing, a folder or unreadable."""
  path = getattr(cfg, 'path', '') or ''
  if not path:
    raise errors.UserInputError(
      f'config.data.path must name {what} when config.data.name == {cfg.name!r}'
    )
  return errors.require_file(path, f'{short} (config.data.path)', errors.DataFileError)


@dataclasses.dataclass(frozen=True)
class Batching:
  """How one iterator batches a split: checked once, read by the shared pipeline."""

  batch_size: int
  seed: int = 0
  shard_index: int = 0
  shard_count: int = 1
  num_epochs: int | None = None  # None: training repeats forever, eval runs once

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {self.batch_size}')
    if not 0 <= self.shard_index < self.shard_count:
      raise ValueError(
        f'need 0 <= shard_index < shard_count, got {self.shard_index}, {self.shard_count}'
      )
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f'num_epochs must be None (forever) or >= 1, got {self.num_epochs}')


class Dataset:
  """One `config.data.name`. Subclasses provide vocab, source and encoder."""

  # Reads config.data.path (`prepare NAME --path FILE`).
  needs_path = False
  # The `prepare` flags besides --data_dir / --manual_dir that this dataset reads.
  prepare_flags: tuple[str, ...] = ()

  def vocab(self, cfg) -> Any:
    """The vocabulary (.size, .pad_id, .bos_id, .eos_id, encode, decode)."""
    raise NotImplementedError

  def source(self, cfg, split: str) -> Any:
    """The records of `split`: anything with len() and [] (grain reads it lazily)."""
    raise NotImplementedError

  def encoder(self, cfg) -> Callable[[Any], np.ndarray]:
    """record -> int32 token array (a whole example; the pipeline crops it)."""
    raise NotImplementedError

  def label(self, cfg) -> str:
    """What error messages call the data."""
    return cfg.name

  def build(self, cfg, split: str, batching: Batching) -> Iterator[dict[str, np.ndarray]]:
    """Batches of {'tokens', 'mask', 'segment_ids'} (sequences.py says how)."""
    from performer.data import sequences  # pylint: disable=g-import-not-at-top  (grain)

    to_tokens = self.encoder(cfg)  # first: a dataset not prepared fails here, at once
    return sequences.build(
      self.source(cfg, split), to_tokens, cfg, split, batching, self.label(cfg)
    )

  def check(self, cfg, splits=SPLITS) -> None:
    """Finds a missing or malformed user file before a model is built; default: nothing
    to check (prepared datasets are checked by vocab and build)."""
    del cfg, splits

  def spec(self, cfg) -> Any:
    """The catalog.Spec of what `prepare` downloads; None for data already on disk."""
    del cfg

  def space_gb(self, cfg) -> dict[str, float]:
    """Estimated GB `prepare` needs: download, prepared, scratch and total."""
    spec = self.spec(cfg)
    if spec is None:
      return {'download': 0.0, 'prepared': 0.0, 'scratch': 0.0, 'total': 0.0}
    return {
      'download': spec.download_gb,
      'prepared': spec.prepared_gb,
      'scratch': spec.scratch_gb,
      'total': spec.total_gb,
    }

  def prepare(self, cfg) -> str:
    """Makes the data ready to train on; returns a one-line summary. Default: check the
    files and build the vocabulary."""
    self.check(cfg)
    return f'{cfg.name} ready: {self.vocab(cfg)!r}'

  def unigram_baseline(self, cfg, split: str) -> dict[str, Any]:
    del split
    raise NotImplementedError(f'no unigram baseline for data.name {cfg.name!r}')

  def word_counts(self, cfg, split: str) -> dict[str, Any]:
    del split
    raise NotImplementedError(f'no word counts for data.name {cfg.name!r}')
