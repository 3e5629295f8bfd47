"""The protein pipeline: a FASTA file in memory, served through grain.

Why in memory: the bundled sample (2,100 proteins, 0.7M residues) and typical
user files fit easily (residues are kept as uint8), and a list is a random-access
source, so grain can shuffle, shard and checkpoint it without ArrayRecord.

The data contract: batches are
``{'tokens': int32 [B, L], 'mask': bool [B, L], 'segment_ids': int32 [B, L]}``.

* Splits: a record goes to train / validation / test (90/5/5) by an MD5 hash of
  its id, so the split never changes when the file is reordered or grows.
* Examples are ``[BOS] + residues + [EOS]``. Longer than L = seq_len: training
  takes a window per ``config.data.crop`` ('random': uniform offset drawn from
  the seed and the example's position in the stream, so it is reproducible and
  differs between epochs; 'start': the first L tokens); eval always takes the
  first L tokens. Shorter: padded with PAD, mask False, segment_ids 0.
* ``pack=True``: grain's first-fit packing puts several examples in one row;
  segment_ids number them 1, 2, 3, ... and are 0 on padding.
* Training repeats ``num_epochs`` times (None = forever), reshuffled every
  epoch, and drops a final partial batch. Eval splits go once, in file order;
  the last batch is filled with all-masked rows (mask False everywhere), and
  every shard yields the same number of batches (shards with fewer rows get
  extra all-masked rows), so multi-host eval loops stay in lockstep and every
  example is seen exactly once overall.
* Sharding: training shards the examples ``shard_index::shard_count``; eval
  shards the rows (examples, or packed rows packed over the whole split).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Any, Iterator

import grain
import numpy as np

from performer import errors
from performer.data import fasta
from performer.data.vocab import PROTEIN_VOCAB, ProteinVocab

SPLITS = ('train', 'validation', 'test')
# Cumulative percent boundaries of the hash split: [0, 90) train, [90, 95) validation, ...
_SPLIT_BOUNDS = {'train': (0, 90), 'validation': (90, 95), 'test': (95, 100)}
CROPS = ('random', 'start')
SAMPLE_PATH = os.path.join(os.path.dirname(__file__), 'resources', 'protein_sample.faa.gz')
# No worker processes or threads: on a 2-core machine the work per batch
# (slicing a few arrays) is far cheaper than any hand-off between threads.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One parsed FASTA file: ids, uint8 residue ids, and the record indices per split."""

  path: str
  ids: tuple[str, ...]
  residues: tuple[np.ndarray, ...]
  splits: dict[str, np.ndarray]
  stats: fasta.FastaStats


def split_of(record_id: str) -> str:
  """The split of a record, from a stable hash of its id (never Python's hash())."""
  bucket = int.from_bytes(hashlib.md5(record_id.encode('utf-8')).digest()[:8], 'big') % 100
  return next(s for s, (lo, hi) in _SPLIT_BOUNDS.items() if lo <= bucket < hi)


def path_for(cfg) -> str:
  """The FASTA file a config names: the bundled sample, or config.data.path."""
  name = cfg.name
  if name == 'protein_sample':
    return SAMPLE_PATH
  if name == 'fasta':
    path = getattr(cfg, 'path', '') or ''
    if not path:
      raise errors.UserInputError(
        "config.data.path must name a FASTA file (optionally .gz) when config.data.name == 'fasta'"
      )
    return os.path.abspath(os.path.expanduser(path))
  raise ValueError(f'the protein pipeline does not serve data.name {name!r}')


def load_corpus(cfg) -> Corpus:
  """Parses and encodes the config's file once per process (cached on path and mtime).

  A missing, unreadable or malformed file is a DataFileError naming it.
  """
  path = path_for(cfg)
  what = 'FASTA file (config.data.path)' if path != SAMPLE_PATH else 'bundled protein sample'
  errors.require_file(path, what, errors.DataFileError)
  st = os.stat(path)
  return _load(path, st.st_mtime_ns, st.st_size)


def check_files(cfg, splits=SPLITS) -> None:
  """Reads the config's FASTA file now (cached for the pipeline) and checks that
  `splits` are non-empty, so a bad file fails before a model is built."""
  corpus = load_corpus(cfg)
  for split in splits:
    _split_examples(corpus, split)


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


def vocab_for(cfg) -> ProteinVocab:
  del cfg
  return PROTEIN_VOCAB


# ---------------------------------------------------------------------------
# Per-example transforms (module-level functions so they stay picklable).


def with_specials(residues: np.ndarray) -> np.ndarray:
  """[BOS] + residues + [EOS] as int32."""
  out = np.empty(len(residues) + 2, np.int32)
  out[0], out[-1] = PROTEIN_VOCAB.bos_id, PROTEIN_VOCAB.eos_id
  out[1:-1] = residues
  return out


def crop_start(residues: np.ndarray, seq_len: int) -> np.ndarray:
  return with_specials(residues)[:seq_len]


def crop_random(residues: np.ndarray, rng: np.random.Generator, seq_len: int) -> np.ndarray:
  tokens = with_specials(residues)
  extra = len(tokens) - seq_len
  if extra <= 0:
    return tokens
  start = int(rng.integers(0, extra + 1))
  return tokens[start : start + seq_len]


def pad_row(tokens: np.ndarray | None, seq_len: int) -> dict[str, np.ndarray]:
  """One unpacked row; None gives an all-masked filler row."""
  row = np.zeros(seq_len, np.int32)  # PAD == 0
  n = 0 if tokens is None else len(tokens)
  if n:
    row[:n] = tokens
  seg = (np.arange(seq_len) < n).astype(np.int32)
  return {'tokens': row, 'mask': seg.astype(bool), 'segment_ids': seg}


def _packed_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  seg = np.asarray(packed['tokens_segment_ids'], np.int32)
  return {'tokens': np.asarray(packed['tokens'], np.int32), 'mask': seg > 0, 'segment_ids': seg}


def pack(
  ds: grain.IterDataset, seq_len: int, num_bins: int, seed: int, shuffle: bool
) -> grain.IterDataset:
  """First-fit packing of int32 token arrays (each <= seq_len) into rows."""
  ds = ds.map(lambda tokens: {'tokens': tokens})
  ds = grain.experimental.FirstFitPackIterDataset(
    ds,
    length_struct={'tokens': seq_len},
    num_packing_bins=num_bins,
    seed=seed,
    shuffle_bins=shuffle,
  )
  return ds.map(_packed_row)


# ---------------------------------------------------------------------------
# The data contract.


def _options(cfg) -> tuple[int, str, bool]:
  seq_len = int(cfg.seq_len)
  if seq_len < 2:
    raise ValueError(f'config.data.seq_len must be >= 2 (BOS plus one token), got {seq_len}')
  crop = getattr(cfg, 'crop', 'random')
  if crop not in CROPS:
    raise ValueError(f'config.data.crop must be one of {CROPS}, got {crop!r}')
  return seq_len, crop, bool(getattr(cfg, 'pack', False))


def _split_examples(corpus: Corpus, split: str) -> list[np.ndarray]:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  examples = [corpus.residues[i] for i in corpus.splits[split]]
  if not examples:
    raise errors.DataFileError(
      f'{corpus.path}: the {split!r} split is empty ({len(corpus.ids)} records; '
      f'the 90/5/5 hash split needs a few dozen records or more)'
    )
  return examples


def build_dataset(
  cfg,
  *,
  split: str,
  batch_size: int,
  seed: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
) -> Iterator[dict[str, Any]]:
  """An iterator of batches (see the module docstring); a grain DatasetIterator,
  so ``get_state()`` / ``set_state()`` checkpoint its position."""
  seq_len, crop, do_pack = _options(cfg)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be None (forever) or >= 1, got {num_epochs}')
  examples = _split_examples(load_corpus(cfg), split)
  if split == 'train':
    ds = _train(
      examples, seq_len, crop, do_pack, batch_size, seed, shard_index, shard_count, num_epochs
    )
  else:
    ds = _eval(examples, seq_len, do_pack, batch_size, shard_index, shard_count, num_epochs or 1)
  return iter(ds)


def _train(
  examples, seq_len, crop, do_pack, batch_size, seed, shard_index, shard_count, num_epochs
) -> grain.IterDataset:
  shard = examples[shard_index::shard_count]
  if not shard:
    raise ValueError(f'train shard {shard_index}/{shard_count} is empty')
  shuffle_seed, crop_seed, pack_seed = (
    int(s) for s in np.random.SeedSequence(seed).generate_state(3)
  )
  ds = grain.MapDataset.source(shard).shuffle(seed=shuffle_seed).repeat(num_epochs)
  if crop == 'random':
    ds = ds.random_map(functools.partial(crop_random, seq_len=seq_len), seed=crop_seed)
  else:
    ds = ds.map(functools.partial(crop_start, seq_len=seq_len))
  if do_pack:
    it = pack(ds.to_iter_dataset(_READ_OPTIONS), seq_len, batch_size, pack_seed, shuffle=True)
    return it.batch(batch_size, drop_remainder=True)
  ds = ds.map(functools.partial(pad_row, seq_len=seq_len)).batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(_READ_OPTIONS)


def _eval(
  examples, seq_len, do_pack, batch_size, shard_index, shard_count, num_epochs
) -> grain.IterDataset:
  if do_pack:
    # Packed over the whole split (not per shard) so the rows do not depend on
    # shard_count; this materialises the eval rows, fine for in-memory data.
    src = grain.MapDataset.source(examples).map(functools.partial(crop_start, seq_len=seq_len))
    rows = list(pack(src.to_iter_dataset(_READ_OPTIONS), seq_len, batch_size, 0, shuffle=False))
    make_row = lambda i: rows[i]
  else:
    rows = examples
    make_row = lambda i: pad_row(crop_start(examples[i], seq_len), seq_len)
  per_shard = math.ceil(len(rows) / shard_count)
  padded = math.ceil(per_shard / batch_size) * batch_size
  index = list(range(shard_index, len(rows), shard_count))
  index += [-1] * (padded - len(index))  # -1: an all-masked filler row
  empty = pad_row(None, seq_len)
  ds = grain.MapDataset.source(index).map(lambda i: make_row(i) if i >= 0 else empty)
  ds = ds.repeat(num_epochs).batch(batch_size)
  return ds.to_iter_dataset(_READ_OPTIONS)


def unigram_baseline(cfg, split: str = 'validation') -> dict[str, Any]:
  """Cross-entropy of a residue-frequency model, a floor any real model must beat.

  Frequencies (add-one smoothed over the 25 residues and EOS) come from the
  full train sequences, residues plus one EOS each. The score averages over
  the tokens the model predicts at eval: the start window of each example of
  `split` (what eval sees), every real token except BOS, so EOS counts only
  when it falls inside the window.
  """
  seq_len, _, _ = _options(cfg)
  corpus = load_corpus(cfg)
  train = _split_examples(corpus, 'train')
  counts = np.bincount(np.concatenate(train), minlength=PROTEIN_VOCAB.size).astype(np.float64)
  counts[PROTEIN_VOCAB.eos_id] += len(train)
  predicted = np.arange(PROTEIN_VOCAB.size) >= PROTEIN_VOCAB.num_special
  predicted[PROTEIN_VOCAB.eos_id] = True
  counts = np.where(predicted, counts + 1.0, 0.0)
  with np.errstate(divide='ignore'):
    log_p = np.log(counts / counts.sum())
  targets = np.concatenate([crop_start(r, seq_len)[1:] for r in _split_examples(corpus, split)])
  ce = float(-log_p[targets].mean())
  # Majority-class accuracy: always predicting the most frequent train token.
  accuracy = float(np.mean(targets == int(np.argmax(counts))))
  return {
    'cross_entropy': ce,
    'perplexity': math.exp(ce),
    'bits_per_token': ce / math.log(2),
    'accuracy': accuracy,
    'num_tokens': int(targets.size),
    'num_train_tokens': int(counts.sum() - predicted.sum()),
    'split': split,
  }
