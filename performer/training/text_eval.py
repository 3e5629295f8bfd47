"""Per-token perplexity of a run on any UTF-8 text file, with the model's own tokenizer.

    python eval.py --config=CONFIG --workdir=W --text_file=notes.txt [--teacher] [--max_tokens=N]

The held-out splits (`train_lib.evaluate`) are the run's own data, cut into examples by the
pipeline. A user's file (a document, another corpus) is different: it is one stream of
text, and the useful comparison is with the softmax original on exactly the same tokens.
So the whole file is tokenised as one stream (BOS first where the vocabulary has one; for
pretrained runs the checkpoint's tokenizer, `config.data.tokenizer`), cut into
non-overlapping windows of `config.data.seq_len` tokens (the last one shorter, masked), and
every token whose predecessor is in its window is scored: the first token of a window has
no context and is not. Token losses are summed on the host in float64, so the result does
not depend on the batch size. `--teacher` scores the model named by train.distill_from (or
train.init_from) the way distillation uses it: this architecture with softmax attention.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from performer import errors, models, tasks
from performer.data import vocab as vocab_lib
from performer.training import build, config_utils, restore, sharding

_EXPECTED = 'expected a UTF-8 text file'
NOT_SCORED_NOTE = 'the first token of each window has no context and is not scored'


def read_text(path: str) -> str:
  """The file's text; a DataFileError (one line) if it is missing, unreadable, binary, not
  UTF-8 or empty, so eval.py never prints a traceback for a bad --text_file."""
  path = errors.require_file(path, '--text_file', errors.DataFileError)
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise errors.DataFileError(
      f'--text_file: cannot read {path!r}: {errors.os_error_text(e)}'
    ) from e
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b'\n') + 1
    raise errors.DataFileError(
      f'--text_file: {path}:{line}: not UTF-8 text ({e.reason}); {_EXPECTED}'
    ) from e
  if '\x00' in text:
    line = text[: text.index('\x00')].count('\n') + 1
    raise errors.DataFileError(f'--text_file: {path}:{line}: binary data (NUL bytes); {_EXPECTED}')
  if not text.strip():
    raise errors.DataFileError(f'--text_file: {path} is empty; {_EXPECTED}')
  return text


def tokenize(vocab, text: str, max_tokens: int = 0) -> np.ndarray:
  """One int32 stream: [BOS] (if the vocabulary has one, as sample.py's prompts) + ids,
  cut to `max_tokens` (0 = all). A protein file is one sequence of residues: whitespace
  (lines wrapped as FASTA wraps them, the newline every editor ends a file with) is not
  part of it."""
  if isinstance(vocab, vocab_lib.ProteinVocab):
    text = ''.join(text.split())
  try:
    ids = list(vocab.encode(text))
  except ValueError as e:  # a vocabulary with a fixed alphabet (proteins)
    raise errors.DataFileError(f'--text_file: {e}') from e
  bos = getattr(vocab, 'bos_id', None)
  ids = ([int(bos)] if bos is not None else []) + ids
  if max_tokens > 0:
    ids = ids[:max_tokens]
  return np.asarray(ids, np.int32)


def make_windows(stream: np.ndarray, seq_len: int):
  """(tokens, mask), both [num_windows, seq_len]: consecutive non-overlapping windows, the
  last one padded with 0 and masked."""
  num = -(-len(stream) // seq_len)
  tokens = np.zeros((num, seq_len), np.int32)
  mask = np.zeros((num, seq_len), bool)
  tokens.reshape(-1)[: len(stream)] = stream
  mask.reshape(-1)[: len(stream)] = True
  return tokens, mask


def scored_count(mask: np.ndarray) -> int:
  """Tokens whose predecessor is in their window: what the loss is summed over."""
  return int(np.sum(mask[:, 1:] & mask[:, :-1]))


def make_loss_fn(graphdef):
  """Jitted (params, projections, stats, rest, tokens, mask) -> (per-token loss, weight), both
  [B, L]: the eval forward pass (stored features and statistics, no dropout)."""

  def token_losses(params, projections, stats, rest, tokens, mask):
    model = nnx.merge(graphdef, params, projections, stats, rest, copy=True)
    logits, _ = model(tokens, mask=mask, deterministic=True)
    _, targets, weights = tasks.causal_targets({'tokens': tokens, 'mask': mask})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return loss, weights

  return jax.jit(token_losses)


def score_windows(loss_fn, trees, tokens, mask, batch_size, batch_sharding):
  """(summed loss in float64, scored tokens) over all windows, `batch_size` at a time
  (the last batch padded with masked rows, so every batch compiles to one program)."""
  total, count = 0.0, 0
  for start in range(0, len(tokens), batch_size):
    batch = {'tokens': tokens[start : start + batch_size], 'mask': mask[start : start + batch_size]}
    pad = batch_size - len(batch['tokens'])
    batch = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in batch.items()}
    loss, weights = jax.device_get(loss_fn(*trees, **sharding.global_batch(batch, batch_sharding)))
    weights = np.asarray(weights, bool)
    total += float(np.sum(np.asarray(loss, np.float64)[weights]))
    count += int(weights.sum())
  return total, count


def teacher_source(config) -> str:
  """train.distill_from, else train.init_from; a UserInputError when neither is set."""
  source = config.train.distill_from or config.train.init_from
  if not source:
    raise errors.UserInputError(
      '--teacher: the config names no original model; set config.train.distill_from or '
      'config.train.init_from (gguf:PATH, hf:DIR or a run of ours)'
    )
  return source


def _short(source: str) -> str:
  """'gguf:tiny.gguf' for 'gguf:/long/path/tiny.gguf': the table stays narrow."""
  fmt, sep, path = source.rpartition(':') if ':' in source else ('', '', source)
  return f'{fmt}{sep}{os.path.basename(path.rstrip("/")) or path}'


def load_original(config, mesh, source):
  """(graphdef, trees) of the original model, exactly as distillation's teacher is built
  (build.load_original)."""
  field = 'distill_from' if config.train.distill_from else 'init_from'
  setting = f'--teacher: config.train.{field}'
  state, params, _ = build.load_original(config, source, mesh, setting)
  return state.graphdef, (params, state.projections, state.stats, state.rest)


def _row(name, total, count):
  loss = total / count
  return {
    'model': name,
    'tokens': count,
    'loss': loss,
    'perplexity': math.exp(loss) if loss < 700 else math.inf,
  }


def score_text(config, workdir, path, teacher=False, max_tokens=0):
  """Scores `path` with the newest checkpoint of `workdir` (and, with `teacher`, the
  original model) on the same windows.

  Returns {'path', 'step', 'stream_tokens', 'windows', 'seq_len', 'rows'}; each row is
  {'model', 'tokens', 'loss' (mean nats per scored token), 'perplexity'}. Raises a
  UserInputError (one line in eval.py) for anything the user can fix.
  """
  if max_tokens < 0:
    raise errors.UserInputError(f'--max_tokens: must be >= 0 (0 = all), got {max_tokens}')
  config, vocab = build.resolve_config(config)
  if tasks.TASKS[config.model.task].samples != 'text':
    raise errors.UserInputError(
      f"--text_file: scores next-token prediction, but this model's task is "
      f'{config.model.task!r}; it needs a {" or ".join(tasks.names(samples="text"))} run'
    )
  source = teacher_source(config) if teacher else None
  seq_len = int(config.data.seq_len)
  if seq_len > config.model.max_len:
    raise config_utils.ConfigError(
      f'config.data.seq_len: {seq_len} windows are longer than the model max_len '
      f'{config.model.max_len}'
    )
  stream = tokenize(vocab, read_text(path), max_tokens)
  tokens, mask = make_windows(stream, seq_len)
  count = scored_count(mask)
  if not count:
    raise errors.DataFileError(
      f'--text_file: {path} gives {len(stream)} token(s); at least 2 are needed to score one'
    )
  models.check_tokens(tokens, config.model.vocab_size)

  sharding.maybe_initialize_distributed()
  if jax.process_count() > 1:
    raise errors.UserInputError('--text_file: runs on one host; start it without multi-host')
  mesh = sharding.make_mesh(config.mesh)
  rows = sharding.batch_devices(mesh)
  batch_size = -(-int(config.train.batch_size) // rows) * rows
  batch_sh = sharding.batch_sharding(mesh)
  run = restore.restore(workdir, config, mesh=mesh)
  step = run.step
  models_to_score = [(f'{config.model.attention.kind}, step {step}', run.state.graphdef, run.trees)]
  if teacher:
    models_to_score.append(
      (f'softmax original {_short(source)}', *load_original(config, mesh, source))
    )
  rows = []
  for name, graphdef, trees in models_to_score:
    total, n = score_windows(make_loss_fn(graphdef), trees, tokens, mask, batch_size, batch_sh)
    assert n == count, (n, count)
    rows.append(_row(name, total, n))
  return {
    'path': os.path.abspath(path),
    'step': step,
    'stream_tokens': len(stream),
    'windows': len(tokens),
    'seq_len': seq_len,
    'rows': rows,
  }


def format_table(result) -> list[str]:
  """The rows side by side: model, scored tokens, loss per token (nats), perplexity."""
  width = max(24, *(len(r['model']) + 2 for r in result['rows']))
  lines = [
    f'== {os.path.basename(result["path"])}: {result["stream_tokens"]} tokens in '
    f'{result["windows"]} windows of {result["seq_len"]}; {NOT_SCORED_NOTE} ==',
    f'{"model":{width}s}{"tokens":>10s}{"loss/token":>13s}{"perplexity":>14s}',
  ]
  for r in result['rows']:
    lines.append(f'{r["model"]:{width}s}{r["tokens"]:10d}{r["loss"]:13.6f}{r["perplexity"]:14.4f}')
  return lines
