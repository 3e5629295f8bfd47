"""eval.py --long_context: passkey and needle prompts, chunked prefill that continues from
a decoding state (softmax's KV cache too), perplexity by position, the window ablation,
and one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_script, tiny_config
from performer import attention, errors, models
from performer.training import long_context, long_context_report, train_lib
from performer.training import recall_prompts as prompts


class CharVocab:
  """One id per character (+ BOS): every piece tokenizes the same alone or in context."""

  bos_id = 0

  def encode(self, text):
    return [ord(c) for c in text]


def test_passkey_prompt_is_exact_length_with_key_at_depth():
  vocab = CharVocab()
  for depth in prompts.depths(5):
    trial = prompts.passkey(vocab, 1500, float(depth), np.random.default_rng(3))
    text = ''.join(map(chr, trial.tokens[1:]))
    assert len(trial.tokens) == 1500 and trial.tokens[0] == 0
    assert text.startswith(prompts.PASSKEY_INTRO) and text.endswith(prompts.PASSKEY_QUERY)
    assert text[: -len(prompts.PASSKEY_QUERY)].endswith(('back again.', 'pass key.'))
    needle = prompts.PASSKEY_NEEDLE.format(key=trial.text_answer)
    at = text.index(needle)
    filler = len(text) - len(prompts.PASSKEY_INTRO) - len(needle) - len(prompts.PASSKEY_QUERY)
    assert abs((at - len(prompts.PASSKEY_INTRO)) / filler - depth) < 0.1
    assert ''.join(map(chr, trial.answer)) == ' ' + trial.text_answer
    assert len(trial.text_answer) == 5
  again = prompts.passkey(vocab, 1500, 0.5, np.random.default_rng(3))
  assert again.text_answer == trial.text_answer  # a seed fixes the key


def test_needle_prompt_sits_in_prose():
  vocab = CharVocab()
  hay = [vocab.encode(s) for s in prompts.sentences(['One two. Three four five! Six?'])]
  trial = prompts.needle(vocab, 900, 0.0, np.random.default_rng(0), hay)
  text = ''.join(map(chr, trial.tokens[1:]))  # after BOS
  assert len(trial.tokens) == 900 and len(trial.text_answer) == 7
  assert text.index(' One of the special magic numbers for ') < 20  # after a unit's end
  assert 'Three four five!' in text and text.endswith('mentioned in the provided text is')
  before_query = text[: text.index(' What is the special magic number')]
  assert before_query.endswith(('One two.', 'Three four five!', 'Six?'))  # whole sentences
  with pytest.raises(ValueError, match='too short'):
    prompts.needle(vocab, 100, 0.5, np.random.default_rng(0), hay)


def test_trials_are_fixed_by_the_seed():
  vocab = CharVocab()
  hay = [vocab.encode(s) for s in prompts.sentences(['Alpha beta. Gamma delta epsilon.'])]
  make = lambda seed: long_context.make_trials(  # noqa: E731
    vocab, long_context.Settings(lengths=(700, 900), trials=3, seed=seed), hay
  )
  first, again, other = make(0), make(0), make(1)
  assert sorted(first) == [(t, n) for t in ('needle', 'passkey') for n in (700, 900)]
  for key, trials in first.items():
    assert [t.depth for t in trials] == [0.0, 0.5, 1.0]
    for a, b in zip(trials, again[key]):
      np.testing.assert_array_equal(a.tokens, b.tokens)
  assert [t.text_answer for t in first['passkey', 700]] != [
    t.text_answer for t in other['passkey', 700]
  ]


def test_bucket_perplexity():
  nll = np.log(np.concatenate([np.full(512, 2.0), np.full(1536, 4.0), np.full(952, 8.0)]))[None]
  out = long_context.bucket_perplexity(nll, 3000)
  assert list(out) == ['0-512', '512-2048', '2048-4096']
  np.testing.assert_allclose(list(out.values()), [2.0, 4.0, 8.0])


@pytest.mark.parametrize('kind', ['softmax', 'hedgehog'])
def test_chunked_read_equals_forward(kind):
  """Reading a sequence in chunks of 8 from a decoding cache gives the forward pass's
  per-token losses (softmax: each chunk attends over the KV cache the earlier ones
  wrote); the greedy step continues from it."""
  config = tiny_config(model__attention__kind=kind, model__attention__window=4)
  if kind == 'softmax':
    config.model.attention.window = 0
  config.model.positions, config.model.vocab_size = 'rotary', 64
  model = models.build_model(models.model_config(config.model), rngs=nnx.Rngs(0))
  graphdef, *trees = models.split(model)
  reader = long_context.Reader('m', graphdef, tuple(trees), chunk=8)
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, 30).astype(np.int32)
  nll, last, cache, _, _ = reader.prefill(tokens[:-1], answer_len=1, targets=tokens[1:])
  logits = model(jnp.asarray(tokens[None]))[0][0]
  want = -jax.nn.log_softmax(logits)[jnp.arange(29), tokens[1:]]
  np.testing.assert_allclose(nll, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(last[0], logits[28], rtol=1e-4, atol=1e-4)
  assert int(reader.greedy(last, cache, 2)[1]) == int(
    jnp.argmax(model(jnp.asarray(np.append(tokens[:-1], jnp.argmax(logits[28]))[None]))[0][0, -1])
  )


def test_window_off_is_the_linear_branch_alone():
  """A hybrid with window_off keeps its gain (a checkpoint loads) and computes what the
  same feature map computes without a window, in the forward pass and in decoding."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 12, 2, 8)), jnp.float32) for _ in range(3))
  hybrid = attention.build('hedgehog', head_dim=8, num_heads=2, window=4, rngs=nnx.Rngs(0))
  off = attention.build(
    'hedgehog', head_dim=8, num_heads=2, window=4, window_off=True, rngs=nnx.Rngs(0)
  )
  plain = attention.build('hedgehog', head_dim=8, num_heads=2, rngs=nnx.Rngs(0))
  assert hasattr(off, 'window_log_gain')
  out = off(q, k, v, causal=True)
  np.testing.assert_allclose(out, plain(q, k, v, causal=True), rtol=1e-6, atol=1e-6)
  assert not np.allclose(out, hybrid(q, k, v, causal=True), atol=1e-3)
  _, state = off.prefill(off.init_state(1, 8), q[:, :11], k[:, :11], v[:, :11])
  np.testing.assert_allclose(
    off.step(state, q[:, 11], k[:, 11], v[:, 11])[0], out[:, 11], rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match='window_off'):
    attention.build('hedgehog', head_dim=8, num_heads=2, window_off=True)


def english_run(folder, **overrides):
  """A 2-step tiny run on english_sample (a text vocabulary with digits), rotary."""
  items = {
    'data__name': 'english_sample',
    'data__vocab_size': 512,
    'model__vocab_size': 0,
    'model__positions': 'rotary',
    'train__num_steps': 2,
    'train__eval_every': 0,
    **overrides,
  }
  args = [f'--config.{k.replace("__", ".")}={v}' for k, v in items.items()]
  train_lib.train_and_evaluate(tiny_config(**items), str(folder), progress=False)
  return args


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  folder = tmp_path_factory.mktemp('long_context')
  teacher = english_run(folder / 'softmax', model__attention__kind='softmax')
  del teacher
  student = english_run(
    folder / 'hybrid',
    model__attention__kind='hedgehog',
    model__attention__window=8,
    train__init_from=str(folder / 'softmax'),
  )
  return folder, student


@pytest.mark.slow
def test_eval_long_context_table_json_heatmap(runs):
  folder, args = runs
  out = folder / 'lc.json'
  common = ['eval.py', '--config=configs/tiny.py', *args, f'--workdir={folder / "hybrid"}']
  common += ['--long_context', '--lengths=300,600', '--trials=2', '--prefill_chunk=64']
  proc = run_script([*common, '--teacher', f'--json={out}'])
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  names = [(r['model'].split(',')[0], r['length']) for r in result['rows']]
  assert names == [
    (n, length) for n in ('hedgehog+window8', 'softmax original') for length in (300, 600)
  ]
  for row in result['rows']:
    assert 0 <= row['passkey'] <= 1 and 0 <= row['needle'] <= 1
    assert list(row['perplexity']) == (['0-512'] if row['length'] == 300 else ['0-512', '512-2048'])
    assert row['tokens_per_s'] > 0 and row['prefill_xla_mib'] > 0
  hybrid, original = result['rows'][:2], result['rows'][2:]
  assert hybrid[0]['state_mib'] == hybrid[1]['state_mib']  # constant in the length
  assert original[1]['state_mib'] > 1.9 * original[0]['state_mib']  # a KV cache grows
  assert (folder / 'lc.png').stat().st_size > 1000
  assert 'passkey' in proc.stdout and 'softmax original' in proc.stdout
  # Deterministic, and the window ablation reads the same checkpoint.
  again = folder / 'again.json'
  proc = run_script([*common, '--config.model.attention.window_off=True', f'--json={again}'])
  assert proc.returncode == 0, proc.stderr[-2000:]
  ablated = json.loads(again.read_text())['rows']
  assert ablated[0]['model'].startswith('hedgehog+window8 (window off)')
  assert ablated[0]['perplexity'] != hybrid[0]['perplexity']
  table = long_context_report.format_table(result)
  assert len(table) == 2 + len(result['rows'])


@pytest.mark.parametrize(
  'extra, message',
  [
    (['--trials=0'], '--trials: must be >= 1'),
    (['--lengths=1024,abc'], '--lengths: comma-separated'),
    (['--tasks=passkey,recall'], '--tasks: choose from passkey, needle'),
    (['--lengths=1024'], 'do not fit the learned position table of 64'),
    (['--lengths=40', '--teacher'], '--teacher: the config names no original model'),
  ],
)
def test_long_context_errors_are_one_line(tmp_path, extra, message):
  """Checked before any model is built (here: a workdir with no run)."""
  proc = run_script(
    ['eval.py', '--config=configs/tiny.py', f'--workdir={tmp_path}', '--long_context', *extra]
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_model_must_be_causal_and_represent_the_length():
  settings = long_context.Settings(lengths=(1024, 4096))
  learned = tiny_config(model__max_len=2048)
  with pytest.raises(errors.UserInputError, match='learned position table of 2048'):
    long_context.check_model(learned, settings)
  rotary = tiny_config(model__max_len=2048, model__positions='rotary')
  long_context.check_model(rotary, settings)  # rotary extrapolates: room is made
  assert rotary.model.max_len == 4096 + 16
  with pytest.raises(errors.UserInputError, match='needs a causal_lm run'):
    long_context.check_model(tiny_config(model__task='mlm'), settings)
  with pytest.raises(errors.UserInputError, match='--trials'):
    long_context.check_settings(long_context.Settings(lengths=(8,), trials=0))
