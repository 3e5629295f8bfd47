"""Text files, one example per line: a user's own file (``data.name='text'``) and the
stdlib's English corpora (english.py) read the same way.

    python train.py --config=configs/lm1b_transformer.py --workdir=/tmp/mytext \\
        --config.data.name=text --config.data.path=/path/to/corpus.txt

* Each non-blank line is one example (a sentence, a paragraph, a document:
  whatever the file's lines are); UTF-8, a trailing newline is stripped.
* Splits: a line goes to train / validation / test (90/5/5) by an MD5 hash of
  its text (dataset.split_of), so duplicate lines never straddle splits and
  the split does not change when the file is reordered or grows.
* Tokenizer: ``config.data.tokenizer`` = 'gguf:PATH' | 'hf:DIR' encodes with a
  pretrained model's own tokenizer (pretrained_vocab.py). Otherwise a
  sentencepiece model (tokenizer.py: unigram, byte fallback,
  lossless) trained on the file's train lines, cached NEXT TO THE FILE as
  ``<file>.spm<vocab_size>.model`` (``config.data.spm_path`` overrides; if the
  file's folder is read-only it goes under ~/.cache/performer_zoo). Delete it
  to retrain. ``config.data.vocab_size`` sets the size (default 8000; a small
  file gives fewer pieces).
* Examples are ``[BOS] + ids + [EOS]``, cropped or packed by sequences.py.

The same helpers count words for per-word perplexity (:func:`word_counts`),
used by lm1b.py too; :data:`SPM_MAX_CHARS` and :func:`vocab_size_for` are shared
with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Callable

import numpy as np

from performer import errors
from performer.data import sequences, tokenizer
from performer.data.dataset import SPLITS, Dataset, check_split, split_of, user_file

DEFAULT_VOCAB_SIZE = 8000
# Characters of training text the tokenizer sees (Flax's lm1b example uses 10M).
SPM_MAX_CHARS = 10_000_000


def vocab_size_for(cfg, default: int = DEFAULT_VOCAB_SIZE) -> int:
  size = int(getattr(cfg, 'vocab_size', 0) or default)
  if size < 8:
    raise ValueError(f'config.data.vocab_size must be >= 8, got {size}')
  return size


_EXPECTED_TEXT = 'expected a UTF-8 text file with one example per line'


@functools.lru_cache(maxsize=4)
def _lines(path: str, mtime_ns: int, size: int) -> dict[str, tuple[str, ...]]:
  """The file's non-blank lines by split; a DataFileError naming the file (and the
  line) if it is unreadable, binary, not UTF-8 or has no train lines."""
  del mtime_ns, size  # Only part of the cache key: an edited file is re-read.
  out = {s: [] for s in SPLITS}
  lineno = 0
  try:
    with open(path, encoding='utf-8') as f:
      for lineno, line in enumerate(f, 1):
        line = line.rstrip('\r\n')
        if '\x00' in line:
          raise errors.DataFileError(f'{path}:{lineno}: binary data (NUL bytes); {_EXPECTED_TEXT}')
        if line.strip():
          out[split_of(line)].append(line)
  except UnicodeDecodeError as e:
    raise errors.DataFileError(
      f'{path}:{_first_non_utf8_line(path) or lineno + 1}: not UTF-8 text '
      f'({e.reason}); {_EXPECTED_TEXT}'
    ) from e
  except OSError as e:
    raise errors.DataFileError(f'cannot read text file {path!r}: {errors.os_error_text(e)}') from e
  if not out['train']:
    total = sum(len(v) for v in out.values())
    if not total:
      raise errors.DataFileError(f'{path}: the file has no non-blank lines; {_EXPECTED_TEXT}')
    raise errors.DataFileError(
      f'{path}: no lines in the train split ({total} non-blank lines; the 90/5/5 hash split '
      'needs a few dozen lines or more)'
    )
  return {s: tuple(v) for s, v in out.items()}


def _first_non_utf8_line(path: str) -> int:
  """The 1-based number of the first line that is not valid UTF-8 (0 if none is found)."""
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, 1):
      try:
        raw.decode('utf-8')
      except UnicodeDecodeError:
        return lineno
  return 0


@functools.lru_cache(maxsize=4)
def _pretrained_vocab(source: str, data_path: str):
  from performer.data.pretrained_vocab import PretrainedVocab  # pylint: disable=g-import-not-at-top

  return PretrainedVocab(source, data_path)


class TextLines(Dataset):
  """A UTF-8 text file, one example per non-blank line: `bundled()` builds and names it
  (english.py), else config.data.path."""

  prepare_flags = ('vocab_size', 'spm_path')

  def __init__(self, bundled: Callable[[], str] | None = None):
    self.bundled = bundled
    self.needs_path = bundled is None

  def path(self, cfg) -> str:
    """The file, absolute; a DataFileError if it is missing, a directory or unreadable."""
    if self.bundled is not None:
      return self.bundled()
    return user_file(cfg, 'a UTF-8 text file', 'text file')

  def label(self, cfg) -> str:
    return self.path(cfg)

  def source(self, cfg, split: str) -> tuple[str, ...]:
    """The split's lines, in file order; a DataFileError if there are none."""
    check_split(split)
    path = self.path(cfg)
    st = os.stat(path)
    splits = _lines(path, st.st_mtime_ns, st.st_size)
    if not splits[split]:
      total = sum(len(v) for v in splits.values())
      raise errors.DataFileError(
        f'{path}: the {split!r} split is empty ({total} lines; the 90/5/5 hash '
        f'split needs a few dozen lines or more)'
      )
    return splits[split]

  def check(self, cfg, splits=SPLITS) -> None:
    for split in splits:
      self.source(cfg, split)

  def spm_path(self, cfg) -> str:
    """Where the file's tokenizer is cached (see the module docstring)."""
    explicit = getattr(cfg, 'spm_path', '') or ''
    if explicit:
      return os.path.abspath(os.path.expanduser(explicit))
    path, size = self.path(cfg), vocab_size_for(cfg)
    beside = f'{path}.spm{size}.model'
    if os.access(os.path.dirname(path), os.W_OK) or os.path.exists(beside):
      return beside
    digest = hashlib.md5(path.encode('utf-8')).hexdigest()[:12]
    return os.path.join(
      os.path.expanduser('~/.cache/performer_zoo'),
      f'{os.path.basename(path)}-{digest}.spm{size}.model',
    )

  def vocab(self, cfg):
    """The file's sentencepiece vocabulary, trained on its train lines on first use; or
    a pretrained model's own tokenizer when `config.data.tokenizer` names one."""
    source = getattr(cfg, 'tokenizer', '') or ''
    if source:
      return _pretrained_vocab(source, self.path(cfg))

    def texts():
      total = 0
      for line in self.source(cfg, 'train'):
        yield line
        total += len(line)
        if total >= SPM_MAX_CHARS:
          return

    return tokenizer.load_or_train(self.spm_path(cfg), texts, vocab_size_for(cfg))

  def encoder(self, cfg):
    return self.vocab(cfg).encode_example

  def space_gb(self, cfg) -> dict[str, float]:
    del cfg  # only a sentencepiece model (~1 MB) next to the file
    return {'download': 0.0, 'prepared': 0.001, 'scratch': 0.0, 'total': 0.001}

  def prepare(self, cfg) -> str:
    vocab = self.vocab(cfg)
    return f'{cfg.name} tokenizer ready: {vocab.path} ({vocab.size} pieces)'

  def word_counts(self, cfg, split: str) -> dict[str, Any]:
    """Word and token counts of `split` for per-word perplexity (see word_counts)."""
    seq_len, _, _ = sequences.check_options(cfg)
    path, vocab = self.path(cfg), self.vocab(cfg)
    st = os.stat(path)
    key = {
      'file': path,
      'mtime_ns': st.st_mtime_ns,
      'spm': os.path.basename(vocab.path),
      'split': split,
      'seq_len': seq_len,
    }
    return cached_word_counts(
      f'{vocab.path}.{split}.L{seq_len}.words.json',
      key,
      lambda: word_counts(self.source(cfg, split), vocab, seq_len),
    )

  def unigram_baseline(self, cfg, split: str) -> dict[str, Any]:
    """Cross-entropy of a token-frequency model fitted on train (add-one smoothed), and
    the accuracy of always predicting its most frequent token."""
    seq_len, _, _ = sequences.check_options(cfg)
    vocab = self.vocab(cfg)
    counts = np.ones(vocab.size, np.float64)
    counts[: vocab.num_special] = 0.0
    for line in self.source(cfg, 'train'):
      counts += np.bincount(vocab.encode_example(line)[1:], minlength=vocab.size)
    log_p = np.log(np.maximum(counts, 1e-30) / counts.sum())
    targets = np.concatenate([vocab.encode_example(t)[1:seq_len] for t in self.source(cfg, split)])
    return {**sequences.unigram_scores(log_p, counts, targets), 'split': split}


def word_counts(texts, vocab, seq_len: int) -> dict[str, Any]:
  """Tokens the eval loop scores and the words they stand for, over `texts`.

  Matches what eval sees: each example is ``[BOS] + ids + [EOS]`` cut to its
  first seq_len tokens; the model predicts every token but BOS. Words follow
  the LM1B convention: whitespace words plus one for the end of sentence
  (EOS). An example longer than seq_len counts the words of its kept tokens
  (no EOS). Per-word perplexity = exp(token_loss / words_per_token).
  """
  num_tokens = num_words = n = 0
  for text in texts:
    text = text.decode('utf-8') if isinstance(text, bytes) else text
    tokens = vocab.encode_example(text)
    n += 1
    if len(tokens) <= seq_len:
      num_tokens += len(tokens) - 1
      num_words += tokenizer.count_words(text) + 1
    else:
      num_tokens += seq_len - 1
      num_words += tokenizer.count_words(vocab.decode(tokens[1:seq_len]))
  return {
    'num_examples': n,
    'num_tokens': num_tokens,
    'num_words': num_words,
    'words_per_token': num_words / max(num_tokens, 1),
    'seq_len': seq_len,
  }


def cached_word_counts(
  cache_path: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
  """`compute()` once, stored as JSON at `cache_path` together with `key`."""
  if os.path.exists(cache_path):
    with open(cache_path, encoding='utf-8') as f:
      stored = json.load(f)
    if stored.get('key') == key:
      return stored['counts']
  counts = compute()
  try:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp = f'{cache_path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({'key': key, 'counts': counts}, f)
    os.replace(tmp, cache_path)
  except OSError:
    pass  # A read-only folder only costs recomputing next time.
  return counts


TEXT = TextLines()
