"""MQAR's data (Zoology's `multiquery_ar`) and its training curriculum, for benchmarks/mqar.py.

Why a module of its own: the sequences and the curriculum are the task's definition, tested
on their own (tests/test_benchmarks.py), apart from the models that learn them. The task
itself is described in benchmarks/mqar.py's docstring.
"""

from __future__ import annotations

import numpy as np

POWER_A = 0.01  # Zoology's power-law exponent for the query gaps
# Zoology's MQAR training mix as a curriculum (`curriculum`: shortest first, equal tokens a
# stage): at L=64 the recall circuit forms in ~300 steps; at L=256 alone, or with the
# lengths interleaved, 600 steps left softmax at chance.
TRAIN_MIX = ('64:4', '128:8', '256:16', '256:32', '256:64')


def mqar_batch(rng, pairs_per_row, length, vocab):
  """One batch: row i holds pairs_per_row[i] key-value pairs (module docstring).

  Returns numpy int32 arrays: tokens [B, L], and for each of the Q = sum(pairs_per_row)
  queries, row by row, its row [Q], position [Q] and target value [Q]."""
  pairs_per_row = np.asarray(pairs_per_row)
  batch, half = len(pairs_per_row), vocab // 2
  tokens = rng.integers(0, vocab, (batch, length))
  starts = np.concatenate([[0], np.cumsum(pairs_per_row)])
  rows = np.repeat(np.arange(batch), pairs_per_row)
  positions, labels = np.zeros_like(rows), np.zeros_like(rows)
  for n in np.unique(pairs_per_row):
    which = np.nonzero(pairs_per_row == n)[0]
    r = len(which)
    keys = 1 + np.argsort(rng.random((r, half - 1)), axis=1)[:, :n]
    values = half + np.argsort(rng.random((r, vocab - half)), axis=1)[:, :n]
    space = (length - 2 * n) // 2
    log_p = (POWER_A - 1.0) * np.log(np.arange(1, space + 1))
    gaps = np.argsort(-(log_p + rng.gumbel(size=(r, space))), axis=1)[:, :n]
    query = 2 * n + 2 * gaps
    tokens[which, : 2 * n : 2], tokens[which, 1 : 2 * n : 2] = keys, values
    tokens[which[:, None], query] = keys
    flat = (starts[which][:, None] + np.arange(n)).ravel()
    positions[flat], labels[flat] = query.ravel(), values.ravel()
  return {
    'tokens': tokens.astype(np.int32),
    'rows': rows.astype(np.int32),
    'positions': positions.astype(np.int32),
    'labels': labels.astype(np.int32),
  }


def train_mix(items):
  """['64:4', '256:16', '256:32'] -> {64: [4], 256: [16, 32]}: the pair counts per length."""
  mix = {}
  for item in items:
    length, sep, pairs = item.partition(':')
    if not sep or not length.isdigit() or not pairs.isdigit():
      raise ValueError(f'expected length:pairs, got {item!r}')
    mix.setdefault(int(length), []).append(int(pairs))
  return dict(sorted(mix.items()))


def curriculum(lengths, steps):
  """The length of each training step: the stages shortest first, each with the same
  number of tokens (steps in proportion to 1 / length), so the cheap short stage, where
  the recall circuit forms, gets the most steps."""
  weights = np.array([1.0 / n for n in lengths])
  ends = np.round(np.cumsum(weights) / weights.sum() * steps).astype(int)
  return np.repeat(lengths, np.diff(ends, prepend=0)).tolist()


def row_pairs(train_pairs, batch):
  """The pair count of each row of a training batch: the counts in equal shares."""
  return np.resize(np.asarray(train_pairs), batch)
