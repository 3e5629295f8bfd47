"""Data pipelines, chosen by ``config.data.name``.

Each name maps to a module that provides ``build_dataset``, ``vocab_for`` and
optionally ``unigram_baseline``, with the signatures below. Modules are
imported lazily so that, e.g., the protein job never imports TFDS. Adding a
dataset is one line in ``_MODULES``.

    it = data.build_dataset(config.data, split='train', batch_size=8, seed=0)
    batch = next(it)  # {'tokens': int32 [B, L], 'mask': bool [B, L], 'segment_ids': int32 [B, L]}

TFDS-backed names (lm1b, imagenet64, uniref50, trembl) check for their prepared
ArrayRecord files first, in both vocab_for and build_dataset, and raise
DatasetNotPreparedError (naming the prepare command) without touching the
network. Also here: eval_word_counts / word_perplexity (text datasets) and
bits_per_dim (images). A missing or malformed user file (config.data.path) is
an ``errors.DataFileError``; :func:`check_files` finds it before a model is built.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterator

# Raised in well under a second (no network) when a TFDS-backed dataset is not on
# disk; its message names the `python -m performer.data.prepare ...` command.
# catalog.py imports no TFDS at module level, so this import stays cheap.
from performer.data.catalog import DatasetNotPreparedError  # noqa: F401

_MODULES = {
  'protein_sample': 'performer.data.protein',  # the bundled 2,100-protein sample
  'fasta': 'performer.data.protein',  # config.data.path: a user's FASTA (.gz ok)
  'text': 'performer.data.text',  # config.data.path: a user's text file
  'english_sample': 'performer.data.text',  # stdlib English prose (offline fine-tuning)
  'english_docs': 'performer.data.text',  # stdlib docs, whole documents (longer contexts)
  'lm1b': 'performer.data.lm1b',  # TFDS lm1b + sentencepiece
  'imagenet64': 'performer.data.imagenet64',  # TFDS downsampled_imagenet / imagenet_resized
  'uniref50': 'performer.data.uniref',  # our TFDS builder over the UniRef50 FASTA
  'trembl': 'performer.data.uniref',  # our TFDS builder over the TrEMBL FASTA
}

NAMES = tuple(_MODULES)


def _module_for(cfg) -> ModuleType:
  name = getattr(cfg, 'name', None)
  if name not in _MODULES:
    raise ValueError(f'unknown config.data.name {name!r}; valid names: {", ".join(NAMES)}')
  return importlib.import_module(_MODULES[name])


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
  """Iterator of batches of numpy arrays for `split` ('train', 'validation', 'test').

  Training repeats `num_epochs` times (None = forever), shuffled per epoch from
  `seed`. Eval splits run once in order; the final batch is padded with
  all-masked rows, so every example is seen exactly once.
  """
  return _module_for(cfg).build_dataset(
    cfg,
    split=split,
    batch_size=batch_size,
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
    num_epochs=num_epochs,
  )


def check_files(cfg, splits=('train', 'validation', 'test')) -> None:
  """Reads the file a config names (config.data.path: FASTA or text) now and checks
  that `splits` are non-empty, so a missing, malformed or too small file fails in about
  a second with an ``errors.DataFileError``, before a model is built. The parsed file
  is cached, so the pipeline does not read it again. Other datasets: a no-op (the
  TFDS-backed ones check for their prepared files in vocab_for and build_dataset).
  """
  module = _module_for(cfg)
  if hasattr(module, 'check_files'):  # protein.py: the bundled sample or a FASTA file
    module.check_files(cfg, splits)
  elif hasattr(module, 'split_lines'):  # text.py: a text file, one example per line
    for split in splits:
      module.split_lines(cfg, split)


def vocab_for(cfg):
  """The tokenizer/vocabulary object for the config (.size, .pad_id, encode, decode, ...)."""
  return _module_for(cfg).vocab_for(cfg)


def unigram_baseline(cfg, split: str = 'validation') -> dict[str, Any]:
  """Unigram cross-entropy (nats) and perplexity on `split`, fitted on train."""
  module = _module_for(cfg)
  if not hasattr(module, 'unigram_baseline'):
    raise NotImplementedError(f'no unigram baseline for data.name {cfg.name!r}')
  return module.unigram_baseline(cfg, split=split)


def eval_word_counts(cfg, split: str = 'test') -> dict[str, Any]:
  """Token and word counts of `split` for per-word perplexity (text datasets only).

  Returns {'num_tokens', 'num_words', 'words_per_token', 'num_examples', 'seq_len'}:
  num_tokens is exactly the number of tokens the eval loop scores over the whole split
  (its 'tokens' metric); word perplexity = exp(token_loss / words_per_token), which
  also holds for an eval over the first few batches. NotImplementedError otherwise.
  """
  module = _module_for(cfg)
  if not hasattr(module, 'eval_word_counts'):
    raise NotImplementedError(f'no word counts for data.name {cfg.name!r}')
  return module.eval_word_counts(cfg, split=split)


def word_perplexity(token_loss: float, counts: dict[str, Any]) -> float:
  """Per-word perplexity from a per-token cross-entropy in nats and eval_word_counts()."""
  import math  # pylint: disable=g-import-not-at-top

  return math.exp(min(token_loss / counts['words_per_token'], 700.0))


def bits_per_dim(nats_per_subpixel: float) -> float:
  """Bits per dimension from a mean cross-entropy in nats per sub-pixel (nats / ln 2)."""
  import math  # pylint: disable=g-import-not-at-top

  return float(nats_per_subpixel) / math.log(2.0)
