"""Data pipelines, chosen by ``config.data.name``.

Each name maps to a module that provides ``build_dataset``, ``vocab_for`` and
optionally ``unigram_baseline``, with the signatures below. Modules are
imported lazily so that, e.g., the protein job never imports TFDS. Adding a
dataset is one line in ``_MODULES``.

    it = data.build_dataset(config.data, split='train', batch_size=8, seed=0)
    batch = next(it)  # {'tokens': int32 [B, L], 'mask': bool [B, L], 'segment_ids': int32 [B, L]}
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterator

_MODULES = {
    "protein_sample": "performer.data.protein",   # the bundled 2,100-protein sample
    "fasta": "performer.data.protein",            # config.data.path: a user's FASTA (.gz ok)
}

NAMES = tuple(_MODULES)


def _module_for(cfg) -> ModuleType:
  name = getattr(cfg, "name", None)
  if name not in _MODULES:
    raise ValueError(f"unknown config.data.name {name!r}; valid names: {', '.join(NAMES)}")
  return importlib.import_module(_MODULES[name])


def build_dataset(cfg, *, split: str, batch_size: int, seed: int = 0, shard_index: int = 0,
                  shard_count: int = 1, num_epochs: int | None = None) -> Iterator[dict[str, Any]]:
  """Iterator of batches of numpy arrays for `split` ('train', 'validation', 'test').

  Training repeats `num_epochs` times (None = forever), shuffled per epoch from
  `seed`. Eval splits run once in order; the final batch is padded with
  all-masked rows, so every example is seen exactly once.
  """
  return _module_for(cfg).build_dataset(
      cfg, split=split, batch_size=batch_size, seed=seed, shard_index=shard_index,
      shard_count=shard_count, num_epochs=num_epochs)


def vocab_for(cfg):
  """The tokenizer/vocabulary object for the config (.size, .pad_id, encode, decode, ...)."""
  return _module_for(cfg).vocab_for(cfg)


def unigram_baseline(cfg, split: str = "validation") -> dict[str, Any]:
  """Unigram cross-entropy (nats) and perplexity on `split`, fitted on train."""
  module = _module_for(cfg)
  if not hasattr(module, "unigram_baseline"):
    raise NotImplementedError(f"no unigram baseline for data.name {cfg.name!r}")
  return module.unigram_baseline(cfg, split=split)
