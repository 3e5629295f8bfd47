"""Protein FASTA files held in memory: the bundled sample (`protein_sample`) and a
user's file (`fasta`, config.data.path).

Why in memory: the bundled sample (2,100 proteins, 0.7M residues) and typical
user files fit easily (residues are kept as uint8), and a list is a random-access
source, so the shared pipeline (sequences.py) shuffles, shards and checkpoints it
without ArrayRecord. This module only parses, splits and encodes:

* Splits: a record goes to train / validation / test (90/5/5) by an MD5 hash of
  its id (dataset.split_of), so the split never changes when the file is
  reordered or grows.
* Examples are ``[BOS] + residues + [EOS]``; sequences.py crops, packs and
  batches them (training windows per ``config.data.crop``, eval the first
  seq_len tokens, ``config.data.pack`` for first-fit packing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import numpy as np

from performer import errors
from performer.data import fasta, sequences
from performer.data.dataset import SPLITS, Dataset, check_split, split_of, user_file
from performer.data.vocab import PROTEIN_VOCAB, ProteinVocab

SAMPLE_PATH = os.path.join(os.path.dirname(__file__), 'resources', 'protein_sample.faa.gz')


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One parsed FASTA file: ids, uint8 residue ids, and the record indices per split."""

  path: str
  ids: tuple[str, ...]
  residues: tuple[np.ndarray, ...]
  splits: dict[str, np.ndarray]
  stats: fasta.FastaStats


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int, size: int) -> Corpus:
  del mtime_ns, size  # Only part of the cache key: an edited file is re-read.
  stats = fasta.FastaStats()
  ids, residues, split_names = [], [], []
  for record_id, _, seq in fasta.parse_fasta(path, stats=stats):
    ids.append(record_id)
    residues.append(PROTEIN_VOCAB.encode_array(seq))
    split_names.append(split_of(record_id))
  if not ids:
    skipped = (
      f' ({stats.empty_skipped} record(s) with an empty sequence)' if stats.empty_skipped else ''
    )
    raise errors.DataFileError(
      f"{path}: no protein sequences found{skipped}; expected FASTA records: a '>' header "
      'line, then residue lines'
    )
  names = np.array(split_names)
  splits = {s: np.flatnonzero(names == s) for s in SPLITS}
  return Corpus(path, tuple(ids), tuple(residues), splits, stats)


def with_specials(residues: np.ndarray) -> np.ndarray:
  """[BOS] + residues + [EOS] as int32: one example."""
  out = np.empty(len(residues) + 2, np.int32)
  out[0], out[-1] = PROTEIN_VOCAB.bos_id, PROTEIN_VOCAB.eos_id
  out[1:-1] = residues
  return out


class ProteinFasta(Dataset):
  """A FASTA file: the bundled sample when `bundled` is set, else config.data.path."""

  def __init__(self, bundled: str = ''):
    self.bundled = bundled
    self.needs_path = not bundled

  def path(self, cfg) -> str:
    if self.bundled:
      return errors.require_file(self.bundled, 'bundled protein sample', errors.DataFileError)
    return user_file(cfg, 'a FASTA file (optionally .gz)', 'FASTA file')

  def corpus(self, cfg) -> Corpus:
    """Parses and encodes the file once per process (cached on path and mtime); a
    missing, unreadable or malformed file is a DataFileError naming it."""
    path = self.path(cfg)
    st = os.stat(path)
    return _load(path, st.st_mtime_ns, st.st_size)

  def vocab(self, cfg) -> ProteinVocab:
    del cfg
    return PROTEIN_VOCAB

  def source(self, cfg, split: str) -> list[np.ndarray]:
    """The uint8 residues of the split's records, in file order."""
    check_split(split)
    corpus = self.corpus(cfg)
    examples = [corpus.residues[i] for i in corpus.splits[split]]
    if not examples:
      raise errors.DataFileError(
        f'{corpus.path}: the {split!r} split is empty ({len(corpus.ids)} records; '
        f'the 90/5/5 hash split needs a few dozen records or more)'
      )
    return examples

  def encoder(self, cfg):
    del cfg
    return with_specials

  def check(self, cfg, splits=SPLITS) -> None:
    for split in splits:
      self.source(cfg, split)

  def unigram_baseline(self, cfg, split: str) -> dict[str, Any]:
    """Cross-entropy of a residue-frequency model, a floor any real model must beat.

    Frequencies (add-one smoothed over the 25 residues and EOS) come from the
    full train sequences, residues plus one EOS each. The score averages over
    the tokens the model predicts at eval: the start window of each example of
    `split` (what eval sees), every real token except BOS, so EOS counts only
    when it falls inside the window.
    """
    seq_len, _, _ = sequences.check_options(cfg)
    train = self.source(cfg, 'train')
    counts = np.bincount(np.concatenate(train), minlength=PROTEIN_VOCAB.size).astype(np.float64)
    counts[PROTEIN_VOCAB.eos_id] += len(train)
    predicted = np.arange(PROTEIN_VOCAB.size) >= PROTEIN_VOCAB.num_special
    predicted[PROTEIN_VOCAB.eos_id] = True
    counts = np.where(predicted, counts + 1.0, 0.0)
    with np.errstate(divide='ignore'):
      log_p = np.log(counts / counts.sum())
    targets = np.concatenate([with_specials(r)[1:seq_len] for r in self.source(cfg, split)])
    scores = sequences.unigram_scores(log_p, counts, targets)
    ce = scores['cross_entropy']
    return {
      'cross_entropy': ce,
      'perplexity': scores['perplexity'],
      'bits_per_token': ce / math.log(2),
      'accuracy': scores['accuracy'],
      'num_tokens': scores['num_tokens'],
      'num_train_tokens': int(counts.sum() - predicted.sum()),
      'split': split,
    }


SAMPLE = ProteinFasta(bundled=SAMPLE_PATH)
FASTA = ProteinFasta()
