"""Sentencepiece tokenizers for text: trained once on the training text, cached on disk.

Choices, and why:

* Unigram model (as in Flax's lm1b example), ``byte_fallback=True``: a
  character never seen in training becomes its UTF-8 bytes instead of <unk>,
  so any text encodes, and ``identity`` normalisation with extra whitespace
  kept: ``decode(encode(s)) == s`` for every string (word counts for per-word
  perplexity are then taken from exactly the text the model sees).
* Ids follow the protein vocabulary: 0 PAD, 1 BOS, 2 EOS, 3 UNK, 4 MASK (a
  control symbol, so the literal text "<mask>" never becomes the MASK token).
* ``hard_vocab_limit=False``: a small file yields a smaller vocabulary rather
  than an error; `.size` is the real size (model.vocab_size=0 picks it up).
* Models are written to a temporary name and renamed, so a crashed or
  concurrent run never leaves a half-written model behind.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)

PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = '<mask>'


class SentencePieceVocab:
  """The vocab object of the data contract: .size, special ids, encode, decode."""

  pad_id, bos_id, eos_id, unk_id, mask_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID
  num_special = 5

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self.path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.size = int(self._sp.get_piece_size())
    if (
      self._sp.pad_id(),
      self._sp.bos_id(),
      self._sp.eos_id(),
      self._sp.unk_id(),
      self._sp.piece_to_id(MASK_PIECE),
    ) != (PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID):
      raise ValueError(
        f'{model_path}: not a performer sentencepiece model (special ids differ '
        f'from PAD 0, BOS 1, EOS 2, UNK 3, MASK 4); delete it to retrain'
      )

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = self._sp.encode(text)
    return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

  def encode_example(self, text: str | bytes) -> np.ndarray:
    """``[BOS] + ids + [EOS]`` as int32: one training example."""
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    return np.asarray([BOS_ID, *self._sp.encode(text), EOS_ID], np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Text; special tokens are dropped. Out-of-range ids are a ValueError."""
    ids = np.asarray(ids if hasattr(ids, 'shape') else list(ids), np.int64).ravel().tolist()
    bad = [i for i in ids if not 0 <= i < self.size]
    if bad:
      raise ValueError(f'token id {bad[0]} is outside the vocabulary [0, {self.size})')
    return self._sp.decode([i for i in ids if i >= self.num_special])

  def __repr__(self):
    return f'SentencePieceVocab(size={self.size}, path={self.path!r})'


def train(
  texts: Iterable[str], model_path: str, vocab_size: int, *, model_type: str = 'unigram'
) -> str:
  """Trains a sentencepiece model on `texts` (one sentence or line each) into `model_path`."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  if vocab_size < 8:
    raise ValueError(f'sentencepiece vocab_size must be >= 8, got {vocab_size}')
  texts = (t.decode('utf-8') if isinstance(t, bytes) else t for t in texts)
  texts = (t for t in texts if t.strip())
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=texts,
      model_writer=model,
      vocab_size=int(vocab_size),
      model_type=model_type,
      pad_id=PAD_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      control_symbols=[MASK_PIECE],
      byte_fallback=True,
      hard_vocab_limit=False,
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      character_coverage=0.9999,
      split_digits=True,
      input_sentence_size=0,
      max_sentence_length=1 << 16,
      num_threads=min(16, os.cpu_count() or 1),
      minloglevel=2,
    )
  except RuntimeError as e:
    if 'smaller than required' in str(e):
      raise ValueError(
        f'config.data.vocab_size={vocab_size} is too small for this text: it needs 256 byte '
        f'pieces, 5 special tokens and one piece per distinct character '
        f'(sentencepiece: {str(e).rsplit("]", 1)[-1].strip()})'
      ) from e
    raise
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.spm-', dir=directory)
  with os.fdopen(fd, 'wb') as f:
    f.write(model.getvalue())
  os.replace(tmp, model_path)
  return model_path


def load_or_train(model_path: str, texts_fn, vocab_size: int) -> SentencePieceVocab:
  """The cached model at `model_path`, trained first from `texts_fn()` if missing."""
  if not os.path.exists(model_path):
    log.info('training a %d-piece sentencepiece model -> %s', vocab_size, model_path)
    train(texts_fn(), model_path, vocab_size)
  st = os.stat(model_path)
  return _load(os.path.abspath(model_path), st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> SentencePieceVocab:
  del mtime_ns  # Part of the cache key only: a retrained model is reloaded.
  return SentencePieceVocab(path)


def count_words(text: str | bytes) -> int:
  """Whitespace-separated words, the unit of published per-word perplexities."""
  if isinstance(text, bytes):
    text = text.decode('utf-8')
  return len(text.split())
