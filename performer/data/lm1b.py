"""LM1B (One Billion Word benchmark) from TFDS `lm1b`, read as ArrayRecord through grain.

Prepare once (needs network, TensorFlow for the TFDS catalog builder, ~10 GB):

    python -m performer.data.prepare lm1b --data_dir ~/tensorflow_datasets

* Splits: 'train' is TFDS train minus its last 10,000 sentences, which are
  'validation'; 'test' is TFDS test (all 50 held-out shards, 306,688
  sentences; published numbers use shard 00000 only, ~6k sentences, so
  expect close but not identical per-word perplexities).
* Tokenizer: a sentencepiece model (tokenizer.py) with
  ``config.data.vocab_size`` pieces (default 30,000, as in Flax's lm1b
  example) trained on the first 10M characters of the training split (TFDS
  stores examples shuffled, so that is a random sample) and cached next to
  the data as ``<data_dir>/lm1b/spm_unigram_<vocab_size>.model``
  (``config.data.spm_path`` overrides). `prepare` trains it; otherwise the
  first run does.
* Examples are ``[BOS] + ids + [EOS]``; with ``config.data.pack=True`` they are
  packed into rows of seq_len with segment_ids, so sentences in one row never
  attend to each other (and positions restart per sentence in the model).
* Per-word perplexity: :meth:`Lm1b.word_counts` (``data.eval_word_counts``)
  gives the tokens eval scores and the words they stand for (whitespace
  words + 1 for the end of sentence, the benchmark's convention); word
  perplexity = exp(token_loss / words_per_token).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from performer.data import catalog, sequences, tokenizer
from performer.data import text as text_lib

SPEC = catalog.Spec(
  'lm1b',
  ('train', 'test'),
  1.8,
  4.3,
  scratch_gb=4.3,
  needs_tensorflow=True,
  note='plus a ~1 MB sentencepiece model trained on the training split',
)
DEFAULT_VOCAB_SIZE = 30_000


def _text(record) -> str:
  value = record['text']
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _encode(record, vocab) -> Any:
  return vocab.encode_example(_text(record))


class Lm1b(catalog.Prepared):
  """TFDS lm1b, tokenized by a sentencepiece model cached next to the data."""

  prepare_flags = ('vocab_size', 'spm_path')

  def spec(self, cfg) -> catalog.Spec:
    del cfg
    return SPEC

  def spm_path(self, cfg) -> str:
    explicit = getattr(cfg, 'spm_path', '') or ''
    if explicit:
      return os.path.abspath(os.path.expanduser(explicit))
    size = text_lib.vocab_size_for(cfg, DEFAULT_VOCAB_SIZE)
    return os.path.join(catalog.data_dir_for(cfg), SPEC.name, f'spm_unigram_{size}.model')

  def vocab(self, cfg) -> tokenizer.SentencePieceVocab:
    """The cached sentencepiece vocabulary; trained from the training split if missing."""
    data_dir = self.require(cfg)  # also when the model exists: a run without data stops here
    path = self.spm_path(cfg)
    if os.path.exists(path):
      return tokenizer.load_or_train(path, None, 0)

    def texts():
      source = catalog.open_source(SPEC, 'train', data_dir)
      return catalog.first_records(source, text_lib.SPM_MAX_CHARS, _text)

    return tokenizer.load_or_train(path, texts, text_lib.vocab_size_for(cfg, DEFAULT_VOCAB_SIZE))

  def encoder(self, cfg):
    return functools.partial(_encode, vocab=self.vocab(cfg))

  def word_counts(self, cfg, split: str) -> dict[str, Any]:
    """{'num_tokens', 'num_words', 'words_per_token', 'num_examples', 'seq_len'} of `split`.

    Computed once (tokenizing the split, ~10 s for test) and cached as JSON next
    to the sentencepiece model.
    """
    seq_len, _, _ = sequences.check_options(cfg)
    vocab = self.vocab(cfg)
    source = self.source(cfg, split)
    key = {
      'dataset': cfg.name,
      'version': os.path.basename(
        catalog.find_prepared(SPEC.name, catalog.data_dir_for(cfg), SPEC.splits) or ''
      ),
      'num_examples': len(source),
      'spm': os.path.basename(vocab.path),
      'split': split,
      'seq_len': seq_len,
    }
    texts = (_text(source[i]) for i in range(len(source)))
    return text_lib.cached_word_counts(
      f'{vocab.path}.{split}.L{seq_len}.words.json',
      key,
      lambda: text_lib.word_counts(texts, vocab, seq_len),
    )

  def prepare(self, cfg) -> str:
    """Downloads and prepares TFDS lm1b as ArrayRecord, then trains the tokenizer."""
    path = catalog.prepare_catalog(SPEC, catalog.data_dir_for(cfg), manual_dir=cfg.manual_dir)
    vocab = self.vocab(cfg)
    return f'lm1b ready in {path}; sentencepiece model {vocab.path} ({vocab.size} pieces)'


LM1B = Lm1b()
