"""Data pipelines, chosen by ``config.data.name`` through one registry.

Every name maps to an object implementing the dataset protocol
(:class:`performer.data.dataset.Dataset`: vocab, source, encoder, check, prepare,
and where it has them a unigram baseline and word counts). The calls below and
``python -m performer.data.prepare`` go through :func:`dataset_for` only, so adding a
dataset is its module plus one line in ``REGISTRY``. Modules are imported on first
use, so, e.g., the protein job never imports TFDS.

    it = data.build_dataset(config.data, split='train', batch_size=8, seed=0)
    batch = next(it)  # {'tokens': int32 [B, L], 'mask': bool [B, L], 'segment_ids': int32 [B, L]}

TFDS-backed names (lm1b, imagenet64, uniref50, trembl) check for their prepared
ArrayRecord files first, in both vocab_for and build_dataset, and raise
DatasetNotPreparedError (naming the prepare command) without touching the
network. A missing or malformed user file (config.data.path) is an
``errors.DataFileError``; :func:`check_files` finds it before a model is built.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Iterator

# catalog.py and dataset.py import no TFDS or grain at module level: this stays cheap.
from performer.data.catalog import DatasetNotPreparedError  # noqa: F401
from performer.data.dataset import CROPS, SPLITS, Batching, Dataset  # noqa: F401

# config.data.name -> 'module:object' implementing Dataset, imported on first use.
REGISTRY = {
  'protein_sample': 'performer.data.protein:SAMPLE',  # the bundled 2,100-protein sample
  'fasta': 'performer.data.protein:FASTA',  # config.data.path: a user's FASTA (.gz ok)
  'text': 'performer.data.text:TEXT',  # config.data.path: a user's text file
  'english_sample': 'performer.data.english:SAMPLE',  # stdlib English prose (offline)
  'english_docs': 'performer.data.english:DOCS',  # stdlib docs, whole documents (long contexts)
  'english_mix': 'performer.data.english_mix:MIX',  # 4 registers from PyPI packages (conversion)
  'english_news': 'performer.data.english_mix:NEWS',  # news articles: a domain held out of the mix
  'lm1b': 'performer.data.lm1b:LM1B',  # TFDS lm1b + sentencepiece
  'imagenet64': 'performer.data.imagenet64:IMAGENET64',  # TFDS downsampled/resized ImageNet
  'uniref50': 'performer.data.uniref:UNIREF50',  # our TFDS builder over the UniRef50 FASTA
  'trembl': 'performer.data.uniref:TREMBL',  # our TFDS builder over the TrEMBL FASTA
}

NAMES = tuple(REGISTRY)


def dataset_for(cfg) -> Dataset:
  """The registered dataset of config.data (anything with a `.name`)."""
  name = getattr(cfg, 'name', None)
  if name not in REGISTRY:
    raise ValueError(f'unknown config.data.name {name!r}; valid names: {", ".join(NAMES)}')
  module, attr = REGISTRY[name].split(':')
  return getattr(importlib.import_module(module), attr)


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
  dataset = dataset_for(cfg)
  batching = Batching(batch_size, seed, shard_index, shard_count, num_epochs)
  return dataset.build(cfg, split, batching)


def check_files(cfg, splits=SPLITS) -> None:
  """Reads the file a config names (config.data.path: FASTA or text) now and checks
  that `splits` are non-empty, so a missing, malformed or too small file fails in about
  a second with an ``errors.DataFileError``, before a model is built. The parsed file
  is cached, so the pipeline does not read it again. Other datasets: a no-op (the
  TFDS-backed ones check for their prepared files in vocab_for and build_dataset).
  """
  dataset_for(cfg).check(cfg, splits)


def vocab_for(cfg):
  """The tokenizer/vocabulary object for the config (.size, .pad_id, encode, decode, ...)."""
  return dataset_for(cfg).vocab(cfg)


def unigram_baseline(cfg, split: str = 'validation') -> dict[str, Any]:
  """Unigram cross-entropy (nats) and perplexity on `split`, fitted on train."""
  return dataset_for(cfg).unigram_baseline(cfg, split)


def eval_word_counts(cfg, split: str = 'test') -> dict[str, Any]:
  """Token and word counts of `split` for per-word perplexity (text datasets only).

  Returns {'num_tokens', 'num_words', 'words_per_token', 'num_examples', 'seq_len'}:
  num_tokens is exactly the number of tokens the eval loop scores over the whole split
  (its 'tokens' metric); word perplexity = exp(token_loss / words_per_token), which
  also holds for an eval over the first few batches. NotImplementedError otherwise.
  """
  return dataset_for(cfg).word_counts(cfg, split)


def word_perplexity(token_loss: float, counts: dict[str, Any]) -> float:
  """Per-word perplexity from a per-token cross-entropy in nats and eval_word_counts()."""
  return math.exp(min(token_loss / counts['words_per_token'], 700.0))


def bits_per_dim(nats_per_subpixel: float) -> float:
  """Bits per dimension from a mean cross-entropy in nats per sub-pixel: nats / ln 2.

  The loss the image model reports is already per sub-pixel (a mean over the
  12,288 tokens of each image), so this is the only conversion needed. A
  uniform model over 256 values scores exactly 8 bits/dim.
  """
  return float(nats_per_subpixel) / math.log(2.0)
