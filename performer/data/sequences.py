"""The shared grain pipeline for token sequences read lazily from a random-access source.

The protein sample pipeline (protein.py) keeps its corpus in memory; LM1B,
UniRef50/TrEMBL and local text files are read example by example from
ArrayRecord (or a line index), so this module does the same crop / pack /
batch / eval-padding work on a lazy source. Behaviour matches protein.py:

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
from performer.data.protein import pack, pad_row

CROPS = ('random', 'start')
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


def check_call(batch_size: int, shard_index: int, shard_count: int, num_epochs) -> None:
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be None (forever) or >= 1, got {num_epochs}')


def window_start(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  return np.asarray(tokens, np.int32)[:seq_len]


def window_random(tokens: np.ndarray, rng: np.random.Generator, seq_len: int) -> np.ndarray:
  tokens = np.asarray(tokens, np.int32)
  extra = len(tokens) - seq_len
  if extra <= 0:
    return tokens
  start = int(rng.integers(0, extra + 1))
  return tokens[start : start + seq_len]


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
  *,
  split: str,
  batch_size: int,
  seed: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  name: str = '',
) -> Iterator[dict[str, np.ndarray]]:
  """Batches from a random-access `source` of records (see the module docstring)."""
  seq_len, crop, do_pack = check_options(cfg)
  check_call(batch_size, shard_index, shard_count, num_epochs)
  if len(source) == 0:
    raise errors.DataFileError(
      f'{name or "dataset"}: the {split!r} split is empty; expected at least one example'
    )
  examples = grain.MapDataset.source(source)
  if split == 'train':
    workers = int(getattr(cfg, 'num_workers', 0) or 0)
    return iter(
      _train(
        examples,
        to_tokens,
        seq_len,
        crop,
        do_pack,
        batch_size,
        seed,
        shard_index,
        shard_count,
        num_epochs,
        name,
        workers,
      )
    )
  windows = examples.map(lambda r: window_start(to_tokens(r), seq_len))
  epochs = num_epochs or 1
  if do_pack:
    return _eval_packed(windows, seq_len, batch_size, shard_index, shard_count, epochs)
  return iter(_eval_rows(windows, seq_len, batch_size, shard_index, shard_count, epochs))


def _train(
  examples,
  to_tokens,
  seq_len,
  crop,
  do_pack,
  batch_size,
  seed,
  shard_index,
  shard_count,
  num_epochs,
  name,
  num_workers=0,
) -> grain.IterDataset:
  shard = examples[shard_index::shard_count]
  if len(shard) == 0:
    raise errors.DataFileError(
      f'{name or "dataset"}: train shard {shard_index}/{shard_count} is empty '
      f'({len(examples)} train examples for {shard_count} shards)'
    )
  shuffle_seed, crop_seed, pack_seed = (
    int(s) for s in np.random.SeedSequence(seed).generate_state(3)
  )
  ds = shard.shuffle(seed=shuffle_seed).repeat(num_epochs).map(to_tokens)
  if crop == 'random':
    ds = ds.random_map(functools.partial(window_random, seq_len=seq_len), seed=crop_seed)
  else:
    ds = ds.map(functools.partial(window_start, seq_len=seq_len))
  if do_pack:
    it = pack(ds.to_iter_dataset(READ_OPTIONS), seq_len, batch_size, pack_seed, shuffle=True)
    it = it.batch(batch_size, drop_remainder=True)
  else:
    ds = ds.map(functools.partial(pad_row, seq_len=seq_len))
    it = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(READ_OPTIONS)
  return _with_workers(it, num_workers)


def _with_workers(it: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers <= 0:
    return it
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (unparsed in notebooks)
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(
    grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
  )


def _eval_rows(
  windows, seq_len, batch_size, shard_index, shard_count, num_epochs
) -> grain.IterDataset:
  n = len(windows)
  per_shard = math.ceil(n / shard_count)
  padded = math.ceil(per_shard / batch_size) * batch_size
  empty = pad_row(None, seq_len)

  def row(j):
    i = shard_index + j * shard_count
    return pad_row(windows[i], seq_len) if i < n else empty

  ds = grain.MapDataset.range(padded).map(row).repeat(num_epochs).batch(batch_size)
  return ds.to_iter_dataset(READ_OPTIONS)


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _eval_packed(
  windows, seq_len, batch_size, shard_index, shard_count, num_epochs
) -> Iterator[dict[str, np.ndarray]]:
  """Packs the whole split in order and keeps this shard's rows; the number of
  filler rows is known only at the end, when every host has seen the same total."""
  empty = pad_row(None, seq_len)
  for _ in range(num_epochs):
    rows = pack(windows.to_iter_dataset(READ_OPTIONS), seq_len, batch_size, 0, shuffle=False)
    buf, total, mine = [], 0, 0
    for total, r in enumerate(rows, 1):
      if (total - 1) % shard_count == shard_index:
        buf.append(r)
        mine += 1
        if len(buf) == batch_size:
          yield _stack(buf)
          buf = []
    padded = math.ceil(math.ceil(total / shard_count) / batch_size) * batch_size
    buf += [empty] * (padded - mine)
    for i in range(0, len(buf), batch_size):
      yield _stack(buf[i : i + batch_size])
