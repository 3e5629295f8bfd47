"""Long-context evaluation of a causal LM run: does it still use what it read far back?

    python eval.py --config=C --workdir=W --long_context --lengths=1024,2048,4096,8192 \
        [--trials=10] [--teacher] [--json=out.json] [--plot=out.png]

Perplexity at short context cannot show whether a linearized model still uses what
it saw thousands of tokens back; retrieval can. For each model (the run, and with
--teacher its softmax original on exactly the same prompts) and each length:

* passkey: a 5-digit key at evenly spaced depths in repeated filler, greedy exact match;
* needle: RULER's single needle in real prose (english_docs' test split);
* perplexity by position: per-token loss over held-out text of the longest length
  (english_docs' test split as one stream, or --text_file), averaged in buckets
  [0, 512), [512, 2k), [2k, 4k), [4k, 8k), ...;
* prefill: every prompt is read in chunks of `prefill_chunk` tokens, each chunk one
  jitted call that continues from the decoding state, so a linear kind holds its
  fixed-size state, never the prompt. Reported: the state's size, XLA's buffer
  assignment for one chunk call (parameters + state + temporaries; on a GPU the
  device's own peak), the process's peak resident memory so far, and tokens/s.

Prompts come from `recall_prompts.py`; a trial's prompt depends only on (--seed,
length, trial), so results are deterministic and both models see the same tokens.
Rotary (or position-free) models may read past their `max_len`; a learned position
table cannot, and such a length is an error.
"""

from __future__ import annotations

import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from performer import errors, tasks
from performer.training import build, restore, sharding, text_eval
from performer.training import recall_prompts as prompts

BUCKET_EDGES = (0, 512, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
TASKS = ('passkey', 'needle')


@dataclasses.dataclass(frozen=True)
class Settings:
  lengths: tuple[int, ...]
  trials: int = 10
  seed: int = 0
  prefill_chunk: int = 512
  text_file: str | None = None
  ppl_windows: int = 2
  tasks: tuple[str, ...] = TASKS


def check_settings(settings: Settings):
  """One-line UserInputErrors for settings no model can run."""
  if not settings.lengths or any(n < 2 for n in settings.lengths):
    raise errors.UserInputError(
      f'--lengths: positive token counts >= 2 expected, got {list(settings.lengths)}'
    )
  if settings.trials < 1:
    raise errors.UserInputError(f'--trials: must be >= 1, got {settings.trials}')
  if settings.prefill_chunk < 1:
    raise errors.UserInputError(f'--prefill_chunk: must be >= 1, got {settings.prefill_chunk}')
  unknown = sorted(set(settings.tasks) - set(TASKS))
  if unknown or not settings.tasks:
    raise errors.UserInputError(f'--tasks: choose from {", ".join(TASKS)}; got {unknown or "none"}')
  if settings.ppl_windows < 1:
    raise errors.UserInputError(f'--ppl_windows: must be >= 1, got {settings.ppl_windows}')


def check_model(config, settings: Settings):
  """The run must be a causal LM that can represent the longest length (rotary and
  position-free models extrapolate: their max_len is raised here)."""
  if tasks.TASKS[config.model.task].samples != 'text':
    raise errors.UserInputError(
      f'--long_context: needs a {" or ".join(tasks.names(samples="text"))} run (prompts and '
      f"greedy answers); this run's task is {config.model.task!r}"
    )
  longest = max(settings.lengths) + 16  # room for the answer
  if longest > config.model.max_len:
    if config.model.positions in ('learned', 'axial'):
      raise errors.UserInputError(
        f'--lengths: {max(settings.lengths)} tokens do not fit the learned position table '
        f'of {config.model.max_len}; use lengths <= {config.model.max_len - 16}'
      )
    config.model.max_len = longest  # rotary / sinusoidal / none: extrapolate


def english_test_documents():
  """english_docs' test split (documents of stdlib prose the conversions never train on)."""
  from performer.data import english  # pylint: disable=g-import-not-at-top

  try:
    return english.DOCS.source(ml_collections.ConfigDict({'name': 'english_docs'}), 'test')
  except OSError as e:
    raise errors.DataFileError(
      f'english_docs: cannot build or read the cached corpus ({errors.os_error_text(e)}); '
      'it is made from the stdlib on first use: python -c "from performer.data import '
      'english; english.docs_path()"'
    ) from e


class Reader:
  """One model's jitted chunk read and greedy step, continuing from a decoding cache."""

  def __init__(self, name, graphdef, trees, chunk):
    self.name, self.graphdef, self.trees, self.chunk = name, graphdef, trees, chunk
    self.model = nnx.merge(graphdef, *trees)
    self._programs = {}

    def read(trees, cache, tokens, mask, targets):
      model = nnx.merge(graphdef, *trees)
      logits, cache = model(tokens, mask=mask, cache=cache)
      logp = jax.nn.log_softmax(logits, axis=-1)
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      last = jnp.sum(mask, axis=1) - 1
      return nll, logits[jnp.arange(tokens.shape[0]), last], cache

    def step(trees, cache, token):
      model = nnx.merge(graphdef, *trees)
      logits, cache = model(token[:, None], cache=cache)
      return logits[:, 0], cache

    self._read = jax.jit(read, donate_argnums=1)
    self._step = jax.jit(step, donate_argnums=1)

  def cache(self, length):
    return self.model.init_cache(1, length)

  def programs(self, cache, width):
    """The read compiled for this cache's shapes and `width` tokens, with XLA's bytes for
    one call; width 0: the greedy step."""
    key = (width, *((x.shape, str(x.dtype)) for x in jax.tree.leaves(cache)))
    if key not in self._programs:
      row = jnp.zeros((1, max(width, 1)), jnp.int32)
      if width:
        fn = self._read.lower(self.trees, cache, row, jnp.ones(row.shape, bool), row).compile()
      else:
        fn = self._step.lower(self.trees, cache, row[0]).compile()
      self._programs[key] = (fn, xla_bytes(fn))
    return self._programs[key]

  def prefill(self, tokens, answer_len=0, targets=None):
    """Reads `tokens` [L] chunk by chunk; returns (per-token nll [L], last logits, cache,
    seconds, XLA bytes of one full-chunk call). targets[t] is scored at position t.

    The first chunk takes the remainder L mod chunk (no padding, whose slots would
    shift positions and a window's ring), the rest are full: two programs a length."""
    length, c = len(tokens), self.chunk
    cache = self.cache(length + answer_len + 1)
    targets = np.zeros(length, np.int32) if targets is None else targets
    cuts = [0] + list(range(length % c or c, length + 1, c))
    reads = {w: self.programs(cache, w) for w in {b - a for a, b in zip(cuts, cuts[1:])}}
    nll = []
    start = time.perf_counter()
    for lo, hi in zip(cuts, cuts[1:]):
      piece = lambda x: np.asarray(x[lo:hi])[None]  # noqa: E731
      mask = np.ones((1, hi - lo), bool)
      out, last, cache = reads[hi - lo][0](self.trees, cache, piece(tokens), mask, piece(targets))
      nll.append(out[0])
    last = jax.block_until_ready(last)
    seconds = time.perf_counter() - start
    return jnp.concatenate(nll), last, cache, seconds, max(r[1] or 0 for r in reads.values())

  def greedy(self, last, cache, count):
    """`count` greedy tokens after a prefill."""
    step = self.programs(cache, 0)[0]
    out = [int(jnp.argmax(last[0]))]
    while len(out) < count:
      logits, cache = step(self.trees, cache, jnp.asarray([out[-1]], jnp.int32))
      out.append(int(jnp.argmax(logits[0])))
    return np.asarray(out, np.int32)


def xla_bytes(compiled):
  """XLA's buffer assignment for a compiled call (arguments + outputs + temporaries)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (
    mem.temp_size_in_bytes
    + mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
  )


def device_peak():
  """The accelerator's measured peak bytes, where the backend reports one (not on CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def tree_mib(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def perplexity_stream(vocab, settings):
  """Windows [n, longest] of held-out tokens for perplexity by position."""
  longest = max(settings.lengths)
  if settings.text_file:
    text = text_eval.read_text(settings.text_file)
  else:
    text = '\n'.join(english_test_documents())
  stream = text_eval.tokenize(vocab, text)
  count = min(settings.ppl_windows, len(stream) // (longest + 1))
  if count < 1:
    source = settings.text_file or "english_docs' test split"
    raise errors.DataFileError(
      f'--long_context: {source} gives {len(stream)} tokens, fewer than the longest length '
      f'{longest} + 1; give a longer --text_file or shorter --lengths'
    )
  return [stream[i * longest : (i + 1) * longest + 1] for i in range(count)]


def bucket_perplexity(nll: np.ndarray, length: int) -> dict[str, float]:
  """Perplexity per position bucket over the first `length` positions of [n, L] nll."""
  out = {}
  for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:]):
    if lo >= length:
      break
    part = nll[:, lo : min(hi, length)]
    out[f'{lo}-{hi}'] = float(np.exp(np.mean(part, dtype=np.float64)))
  return out


def make_trials(vocab, settings, haystack):
  """{(task, length): [Trial]}, fixed by (seed, task, length, trial)."""
  trials = {}
  for t, task in enumerate(settings.tasks):
    for length in settings.lengths:
      rows = []
      for i, depth in enumerate(prompts.depths(settings.trials)):
        rng = np.random.default_rng([settings.seed, t, length, i])
        try:
          if task == 'passkey':
            rows.append(prompts.passkey(vocab, length, float(depth), rng))
          else:
            rows.append(prompts.needle(vocab, length, float(depth), rng, haystack))
        except ValueError as e:
          raise errors.UserInputError(f'--lengths: {e}') from e
      trials[task, length] = rows
  return trials


def evaluate_model(reader, settings, trials, ppl_windows):
  """Rows (one per length) for one model."""
  nll = []
  for window in ppl_windows:
    out = reader.prefill(window[:-1], targets=window[1:])[0]
    nll.append(np.asarray(out, np.float64))
  nll = np.stack(nll)
  rows = []
  for length in settings.lengths:
    row = {'model': reader.name, 'length': length}
    seconds = tokens = 0
    for task in settings.tasks:
      hits = []
      for trial in trials[task, length]:
        _, last, cache, secs, peak = reader.prefill(trial.tokens, len(trial.answer))
        seconds, tokens = seconds + secs, tokens + length
        got = reader.greedy(last, cache, len(trial.answer))
        hits.append(bool(np.array_equal(got, trial.answer)))
      row[task] = float(np.mean(hits))
      row[f'{task}_hits'] = [[trial.depth, hit] for trial, hit in zip(trials[task, length], hits)]
    row['perplexity'] = bucket_perplexity(nll, length)
    row['state_mib'] = tree_mib(reader.cache(length + 1))
    row['prefill_xla_mib'] = peak / 2**20 if peak is not None else None
    row['device_peak_mib'] = (device_peak() or 0) / 2**20 or None
    row['rss_mib'] = rss_mib()
    row['tokens_per_s'] = tokens / seconds if seconds else None
    rows.append(row)
  return rows


def run(config, workdir, settings: Settings, teacher=False):
  """The long-context table of the run in `workdir` (and, with `teacher`, its softmax
  original): {'settings', 'step', 'rows', 'models'}."""
  check_settings(settings)
  config, vocab = build.resolve_config(config)
  trained_len = int(config.model.max_len)
  check_model(config, settings)
  source = text_eval.teacher_source(config) if teacher else None
  try:
    vocab.encode('The pass key is 12345.')
  except ValueError as e:  # a fixed alphabet (proteins)
    raise errors.UserInputError(
      f'--long_context: the prompts are English text; this vocabulary cannot encode it ({e})'
    ) from e
  haystack = [
    [int(i) for i in vocab.encode(s)] for s in prompts.sentences(english_test_documents())
  ]
  trials = make_trials(vocab, settings, haystack)
  windows = perplexity_stream(vocab, settings)
  if jax.process_count() > 1:
    raise errors.UserInputError('--long_context: runs on one host; start it without multi-host')
  mesh = sharding.make_mesh(config.mesh)
  if int(config.mesh.seq) > 1:
    raise errors.UserInputError('--long_context: reads with one device; set config.mesh.seq=1')
  run = restore.restore(workdir, config, mesh=mesh)
  step, graphdef, trees = run.step, run.state.graphdef, run.trees
  att = config.model.attention
  name = f'{att.kind}' + (f'+window{att.window}' if att.window else '')
  name += f'+sinks{att.sinks}' if att.get('sinks') else ''
  name += f'+cache{att.sparse_cache}' if att.get('sparse_cache') else ''
  name += f'({att.sparse_cache_dtype})' if att.get('sparse_cache_dtype') else ''
  name += '+leave1out' if att.get('sparse_cache_leave_one_out') else ''
  name += '+nope' if att.get('linear_nope') else ''  # the linear part without RoPE
  name += f'+halflife{att.linear_half_life}' if att.get('linear_half_life') else ''
  name += f'+clamp{att.rope_clamp}' if att.get('rope_clamp') else ''
  name += ' (window off)' if att.get('window_off') else ''
  readers = [Reader(f'{name}, step {step}', graphdef, trees, settings.prefill_chunk)]
  if teacher:
    t_graphdef, t_trees = text_eval.load_original(config, mesh, source)
    readers.append(Reader('softmax original', t_graphdef, t_trees, settings.prefill_chunk))
  rows = []
  for reader in readers:
    rows += evaluate_model(reader, settings, trials, windows)
  return {
    'settings': dataclasses.asdict(settings),
    'step': step,
    'max_len': trained_len,
    'ppl_tokens': int(sum(len(w) - 1 for w in windows)),
    'rows': rows,
  }
