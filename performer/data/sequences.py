"""The one grain pipeline every dataset's batches come from.

Why one: a dataset only says where its records are (a random-access source:
an in-memory list for a FASTA or text file, ArrayRecord for TFDS data) and how
a record becomes tokens (dataset.Dataset); cropping, packing, sharding,
batching and eval padding are the same for all, so they live here once.

* An example is a full int32 token array made by `to_tokens(record)`
  (e.g. ``[BOS] + ids + [EOS]``). Longer than L = seq_len: training takes a
  window per ``crop`` ('random': a uniform offset drawn from the seed and the
  example's position in the stream; 'start': the first L tokens); eval always
  takes the first L tokens (a fixed window, so eval numbers are reproducible).
* Unpacked rows are padded with PAD (id 0), mask False, segment_ids 0.
  Packed rows (grain's first-fit packing) number their examples 1, 2, 3, ...
  in segment_ids, so packed examples never attend to each other.
* Training shards examples ``shard_index::shard_count``, shuffles per epoch,
  repeats `num_epochs` times (None = forever), drops a final partial batch
  and returns a grain DatasetIterator (``get_state``/``set_state``).
* ``config.data.num_workers`` (optional, default 0 = in this process): grain
  worker processes for training batches. One process reads, tokenizes and
  packs roughly 3,000 LM1B-sized sentences per second, so an accelerator host
  that trains LM1B at batch 256 x 256 wants 8-16 workers. Each worker takes a
  slice of the examples, so changing num_workers changes the batch order (and
  a checkpointed data position only resumes with the same num_workers).
* Eval runs once in order; every shard yields the same number of batches,
  the last ones filled with all-masked rows, so every example is seen exactly
  once and multi-host eval loops stay in lockstep. Packed eval packs the whole
  split in order on every host (each host reads the split) and keeps rows
  ``shard_index::shard_count``, so the rows do not depend on shard_count.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator

import grain
import numpy as np

from performer import errors
from performer.data.dataset import CROPS, Batching

# No worker threads: on small machines the per-example work is cheaper than a hand-off.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def check_options(cfg, *, min_len: int = 2) -> tuple[int, str, bool]:
  """(seq_len, crop, pack) from config.data, validated with messages naming the key."""
  seq_len = int(cfg.seq_len)
  if seq_len < min_len:
    raise ValueError(f'config.data.seq_len must be >= {min_len}, got {seq_len}')
  crop = getattr(cfg, 'crop', 'random')
  if crop not in CROPS:
    raise ValueError(f'config.data.crop must be one of {CROPS}, got {crop!r}')
  return seq_len, crop, bool(getattr(cfg, 'pack', False))


def window_start(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  return np.asarray(tokens, np.int32)[:seq_len]


def window_random(tokens: np.ndarray, rng: np.random.Generator, seq_len: int) -> np.ndarray:
  tokens = np.asarray(tokens, np.int32)
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


def unpack(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
  """The token arrays of every segment of a batch, row by row (inverse of packing)."""
  out = []
  for tokens, seg in zip(batch['tokens'], batch['segment_ids']):
    for s in np.unique(seg[seg > 0]):
      out.append(tokens[seg == s])
  return out


def build(
  source,
  to_tokens: Callable[[Any], np.ndarray],
  cfg,
  split: str,
  batching: Batching,
  name: str,
) -> Iterator[dict[str, np.ndarray]]:
  """Batches from a random-access `source` of records (see the module docstring)."""
  seq_len, crop, do_pack = check_options(cfg)
  if len(source) == 0:
    raise errors.DataFileError(
      f'{name}: the {split!r} split is empty; expected at least one example'
    )
  examples = grain.MapDataset.source(source)
  if split == 'train':
    workers = int(getattr(cfg, 'num_workers', 0) or 0)
    it = _train(examples.map(to_tokens), seq_len, crop, do_pack, batching, name)
    return iter(_with_workers(it, workers))
  windows = examples.map(lambda r: window_start(to_tokens(r), seq_len))
  if do_pack:
    return _eval_packed(windows, seq_len, batching)
  return iter(_eval_rows(windows, seq_len, batching))


def _train(tokens, seq_len, crop, do_pack, batching: Batching, name) -> grain.IterDataset:
  shard = tokens[batching.shard_index :: batching.shard_count]
  if len(shard) == 0:
    raise errors.DataFileError(
      f'{name}: train shard {batching.shard_index}/{batching.shard_count} is empty '
      f'({len(tokens)} train examples for {batching.shard_count} shards)'
    )
  shuffle_seed, crop_seed, pack_seed = (
    int(s) for s in np.random.SeedSequence(batching.seed).generate_state(3)
  )
  ds = shard.shuffle(seed=shuffle_seed).repeat(batching.num_epochs)
  if crop == 'random':
    ds = ds.random_map(functools.partial(window_random, seq_len=seq_len), seed=crop_seed)
  else:
    ds = ds.map(functools.partial(window_start, seq_len=seq_len))
  size = batching.batch_size
  if do_pack:
    it = pack(ds.to_iter_dataset(READ_OPTIONS), seq_len, size, pack_seed, shuffle=True)
    return it.batch(size, drop_remainder=True)
  ds = ds.map(functools.partial(pad_row, seq_len=seq_len))
  return ds.batch(size, drop_remainder=True).to_iter_dataset(READ_OPTIONS)


def _with_workers(it: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers <= 0:
    return it
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (unparsed in notebooks)
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(
    grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
  )


def _eval_rows(windows, seq_len, batching: Batching) -> grain.IterDataset:
  n, size = len(windows), batching.batch_size
  padded = math.ceil(math.ceil(n / batching.shard_count) / size) * size
  empty = pad_row(None, seq_len)

  def row(j):
    i = batching.shard_index + j * batching.shard_count
    return pad_row(windows[i], seq_len) if i < n else empty

  ds = grain.MapDataset.range(padded).map(row).repeat(batching.num_epochs or 1).batch(size)
  return ds.to_iter_dataset(READ_OPTIONS)


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _eval_packed(windows, seq_len, batching: Batching) -> Iterator[dict[str, np.ndarray]]:
  """Packs the whole split in order and keeps this shard's rows; the number of
  filler rows is known only at the end, when every host has seen the same total."""
  size, shard_index, shard_count = batching.batch_size, batching.shard_index, batching.shard_count
  empty = pad_row(None, seq_len)
  for _ in range(batching.num_epochs or 1):
    rows = pack(windows.to_iter_dataset(READ_OPTIONS), seq_len, size, 0, shuffle=False)
    buf, total, mine = [], 0, 0
    for total, r in enumerate(rows, 1):
      if (total - 1) % shard_count == shard_index:
        buf.append(r)
        mine += 1
        if len(buf) == size:
          yield _stack(buf)
          buf = []
    padded = math.ceil(math.ceil(total / shard_count) / size) * size
    buf += [empty] * (padded - mine)
    for i in range(0, len(buf), size):
      yield _stack(buf[i : i + size])


def unigram_scores(log_p: np.ndarray, counts: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
  """Cross-entropy (nats) and perplexity of a unigram model `log_p` on `targets`, and
  the majority-class accuracy of always predicting the most frequent train token."""
  ce = float(-log_p[targets].mean())
  return {
    'cross_entropy': ce,
    'perplexity': math.exp(ce),
    'accuracy': float(np.mean(targets == int(np.argmax(counts)))),
    'num_tokens': int(targets.size),
  }
