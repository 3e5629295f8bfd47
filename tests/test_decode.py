"""Tests for recurrent decoding and sampling: tiny models (1-2 layers, width 32).

The decode functions are jitted through nnx.split/merge once per model, so
each configuration compiles its prefill and its step once for the file.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import kind_params
from performer import attention, models, sampling

VOCAB = 13
IMAGE_SHAPE = (4, 4, 3)  # 48 sub-pixels


def make_config(task='causal_lm', kind='favor_softmax', positions='learned'):
  image = task == 'image_ar'
  return ml_collections.ConfigDict(
    dict(
      task=task,
      vocab_size=256 if image else VOCAB,
      num_layers=2,
      num_heads=2,
      emb_dim=32,
      mlp_dim=64,
      dropout_rate=0.0,
      max_len=48 if image else 32,
      positions=positions,
      dtype='float32',
      image_shape=IMAGE_SHAPE if image else None,
      attention=dict(kind=kind, num_features=16, chunk_size=4),
    )
  )


@functools.lru_cache(maxsize=None)
def cached_model(task='causal_lm', kind='favor_softmax', positions='learned'):
  return models.build_model(make_config(task, kind, positions), rngs=nnx.Rngs(params=0, dropout=1))


@functools.lru_cache(maxsize=None)
def jitted(model):
  """(forward, prefill, step) as pure jitted functions of the model state."""
  graphdef, state = nnx.split(model)

  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]

  def prefill(state, inputs, mask, max_length):
    m = nnx.merge(graphdef, state)
    return m(inputs, mask=mask, cache=m.init_cache(inputs.shape[0], max_length))

  def step(state, inputs_t, cache):
    logits, cache = nnx.merge(graphdef, state)(inputs_t[:, None], cache=cache)
    return logits[:, 0], cache

  return (
    functools.partial(jax.jit(forward), state),
    functools.partial(jax.jit(prefill, static_argnums=3), state),
    functools.partial(jax.jit(step), state),
  )


def random_tokens(seed, shape, vocab):
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def check_decode_matches_forward(model, length=14, prompt_lengths=(3, 8)):
  """Prefill rows with prompts of different lengths (right-padded), then feed
  the rest of each row token by token at its own position: every logit
  equals the full forward pass over the same sequence."""
  forward, prefill, step = jitted(model)
  batch = len(prompt_lengths)
  tokens = random_tokens(0, (batch, length), model.vocab_size)
  full = np.asarray(forward(jnp.asarray(tokens)))
  inputs = np.asarray(model.decode_inputs(tokens))  # START-prefixed for images
  shift = inputs.shape[1] - length  # 1 for image_ar, else 0
  lens = np.asarray(prompt_lengths)
  width = int(lens.max())
  mask = np.arange(width)[None] < lens[:, None]
  prompt = np.where(mask, inputs[:, :width], 0)
  logits, cache = prefill(jnp.asarray(prompt), jnp.asarray(mask), inputs.shape[1])
  logits = np.asarray(logits)
  for b, n in enumerate(lens):
    np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(cache['positions']), lens)
  for i in range(length + shift - width):
    pos = lens + i  # each row's own position
    feed = inputs[np.arange(batch), np.minimum(pos, inputs.shape[1] - 1)]
    logits_t, cache = step(jnp.asarray(feed), cache)
    for b in range(batch):
      if pos[b] < length:
        np.testing.assert_allclose(np.asarray(logits_t)[b], full[b, pos[b]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', kind_params(attention.KINDS))
@pytest.mark.parametrize('task', ['causal_lm', 'image_ar'])
def test_decode_matches_full_forward_every_kind(task, kind):
  check_decode_matches_forward(cached_model(task, kind))


@pytest.mark.parametrize(
  'task,positions,kind',
  [
    ('causal_lm', 'rotary', 'favor_softmax'),
    ('causal_lm', 'rotary', 'softmax'),
    ('causal_lm', 'sinusoidal', 'favor_softmax'),
    ('causal_lm', 'none', 'favor_softmax'),
    ('image_ar', 'axial', 'favor_softmax'),
    ('image_ar', 'rotary', 'softmax'),
  ],
)
def test_decode_matches_forward_every_position_kind(task, positions, kind):
  """Additive positions are looked up, and RoPE applied, at each row's own
  absolute position during decoding."""
  check_decode_matches_forward(cached_model(task, kind, positions))


def test_favor_cache_size_does_not_grow_with_context():
  model = cached_model('causal_lm', 'favor_softmax')
  size = lambda c: sum(x.size for x in jax.tree.leaves(c))
  assert size(model.init_cache(1, 16)) == size(model.init_cache(1, 4096))
  soft = cached_model('causal_lm', 'softmax')
  assert size(soft.init_cache(1, 4096)) > 100 * size(soft.init_cache(1, 16))


def test_mlm_cannot_decode():
  config = make_config()
  config.task = 'mlm'
  model = models.build_model(config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='causal'):
    model.init_cache(1, 8)
  with pytest.raises(ValueError, match='causal'):
    sampling.generate(model, np.ones((1, 2), np.int32), max_new_tokens=2, temperature=0)


# --- generate ------------------------------------------------------------------

PROMPTS = [[1, 4, 5], [1, 6, 7, 8, 9, 10], [1]]


def greedy_reference(model, prompt, steps):
  """Greedy continuation by repeated full forward passes (no cache)."""
  forward, _, _ = jitted(model)
  seq = list(prompt)
  for _ in range(steps):
    padded = np.zeros((1, model.max_len), np.int32)
    padded[0, : len(seq)] = seq
    logits = np.asarray(forward(jnp.asarray(padded)))[0]
    # causal_lm: logits[t] predicts t+1; image_ar: logits[t] predicts t.
    seq.append(int(np.argmax(logits[len(seq) - model.target_offset])))
  return seq


@pytest.mark.parametrize(
  'task,kind',
  [('causal_lm', 'favor_softmax'), ('causal_lm', 'softmax'), ('image_ar', 'favor_relu')],
)
def test_greedy_equals_argmax_of_full_forward(task, kind):
  model = cached_model(task, kind)
  prompts = PROMPTS if task == 'causal_lm' else [[10, 200, 30], [], [7]]
  tokens, lengths = sampling.pad_prompts(prompts)
  steps = 6
  out, out_len = sampling.generate(model, tokens, lengths, max_new_tokens=steps, temperature=0)
  out, out_len = np.asarray(out), np.asarray(out_len)
  assert out.shape == (len(prompts), tokens.shape[1] + steps)
  np.testing.assert_array_equal(out_len, lengths + steps)
  for b, prompt in enumerate(prompts):
    ref = greedy_reference(model, prompt, steps)
    np.testing.assert_array_equal(out[b, : out_len[b]], ref)
    assert (out[b, out_len[b] :] == 0).all()


def test_fixed_key_is_deterministic_and_keys_differ():
  model = cached_model('causal_lm', 'favor_softmax')
  tokens, lengths = sampling.pad_prompts(PROMPTS)
  run = lambda seed: np.asarray(
    sampling.generate(
      model, tokens, lengths, max_new_tokens=12, key=jax.random.key(seed), temperature=1.5
    )[0]
  )
  first = run(0)
  np.testing.assert_array_equal(first, run(0))
  assert not np.array_equal(first, run(1))
  # A raw uint32 key works too.
  out = sampling.generate(model, tokens, lengths, max_new_tokens=3, key=jax.random.PRNGKey(0))[0]
  assert out.shape == (3, 9)


def test_top_k_1_and_tiny_top_p_equal_greedy():
  model = cached_model('causal_lm', 'linear_elu')
  tokens, lengths = sampling.pad_prompts(PROMPTS)
  gen = functools.partial(
    sampling.generate, model, tokens, lengths, max_new_tokens=8, key=jax.random.key(3)
  )
  greedy = np.asarray(gen(temperature=0)[0])
  np.testing.assert_array_equal(np.asarray(gen(top_k=1)[0]), greedy)
  np.testing.assert_array_equal(np.asarray(gen(top_p=1e-6)[0]), greedy)


def test_sample_logits_support():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  keys = jax.random.split(jax.random.key(0), 256)
  draw = jax.vmap(lambda k, **kw: sampling.sample_logits(k, logits, **kw)[0])
  top2 = set(
    np.asarray(jax.vmap(lambda k: sampling.sample_logits(k, logits, top_k=2)[0])(keys)).tolist()
  )
  assert top2 == {1, 3}
  nucleus = set(
    np.asarray(jax.vmap(lambda k: sampling.sample_logits(k, logits, top_p=0.7)[0])(keys)).tolist()
  )
  assert nucleus == {1, 3}  # 0.5 < 0.7, then 0.5 + 0.3 covers it
  everything = set(np.asarray(draw(keys)).tolist())
  assert everything == {0, 1, 2, 3}
  assert int(sampling.sample_logits(None, logits, temperature=0)[0]) == 1


def test_eos_stops_rows_independently():
  model = cached_model('causal_lm', 'favor_softmax')
  tokens, lengths = sampling.pad_prompts(PROMPTS)
  steps = 10
  free, _ = sampling.generate(model, tokens, lengths, max_new_tokens=steps, temperature=0)
  free = np.asarray(free)
  new = [free[b, lengths[b] : lengths[b] + steps] for b in range(len(PROMPTS))]
  # Pick as EOS a token that ends one row early and not every row at once.
  candidates = sorted(set(new[0].tolist()) | set(new[1].tolist()))

  def stops(eos):
    return [int(np.argmax(r == eos)) + 1 if (r == eos).any() else steps for r in new]

  eos = max(candidates, key=lambda t: len(set(stops(t))))
  expected_new = stops(eos)
  assert len(set(expected_new)) > 1, 'test needs rows that stop at different steps'
  out, out_len = sampling.generate(
    model, tokens, lengths, max_new_tokens=steps, temperature=0, eos_id=eos, pad_id=0
  )
  out, out_len = np.asarray(out), np.asarray(out_len)
  np.testing.assert_array_equal(out_len, lengths + np.asarray(expected_new))
  for b in range(len(PROMPTS)):
    n = out_len[b]
    np.testing.assert_array_equal(out[b, :n], free[b, :n])  # same until EOS
    assert (out[b, n:] == 0).all()  # PAD after it
    if expected_new[b] < steps:
      assert out[b, n - 1] == eos


def test_row_whose_first_token_is_eos_stops_at_once():
  model = cached_model('causal_lm', 'favor_softmax')
  tokens, lengths = sampling.pad_prompts(PROMPTS)
  first = np.asarray(sampling.generate(model, tokens, lengths, max_new_tokens=1, temperature=0)[0])
  for b in range(len(PROMPTS)):
    eos = int(first[b, lengths[b]])
    out, n = sampling.generate(
      model, tokens[b : b + 1], lengths[b : b + 1], max_new_tokens=5, temperature=0, eos_id=eos
    )
    assert np.asarray(out).shape == (1, tokens.shape[1] + 5)  # fixed buffer
    assert int(n[0]) == lengths[b] + 1
    assert (np.asarray(out)[0, lengths[b] + 1 :] == 0).all()


def test_bad_prompts_and_options_raise_clear_errors():
  model = cached_model('causal_lm', 'favor_softmax')
  ok = np.ones((1, 4), np.int32)
  gen = functools.partial(sampling.generate, model, temperature=0)
  with pytest.raises(ValueError, match='longer than the model max_len 32'):
    gen(np.ones((1, 33), np.int32), max_new_tokens=1)
  with pytest.raises(ValueError, match='exceeds the model max_len 32.*<= 28'):
    gen(ok, max_new_tokens=29)
  with pytest.raises(ValueError, match=r'token id 13 at \(row 0, position 2\)'):
    gen(np.array([[1, 2, 13, 4]], np.int32), max_new_tokens=1)
  with pytest.raises(ValueError, match='at least one token'):
    gen(ok, np.array([0]), max_new_tokens=1)
  with pytest.raises(ValueError, match='int array'):
    gen(np.ones((4,), np.int32), max_new_tokens=1)
  with pytest.raises(ValueError, match='needs a PRNG key'):
    sampling.generate(model, ok, max_new_tokens=1, temperature=1.0)
  with pytest.raises(ValueError, match='top_p'):
    gen(ok, max_new_tokens=1, top_p=0.0)
  with pytest.raises(ValueError, match='top_k'):
    gen(ok, max_new_tokens=1, top_k=-1)
  with pytest.raises(ValueError, match='temperature'):
    gen(ok, max_new_tokens=1, temperature=-1.0)
  with pytest.raises(ValueError, match='max_new_tokens'):
    gen(ok, max_new_tokens=0)


# --- sample.py and the benchmark -------------------------------------------------


def _save_run(workdir, **overrides):
  """A workdir as training leaves it (config.json + one orbax checkpoint)."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from performer.training import build, checkpoints, metrics  # pylint: disable=g-import-not-at-top

  config, _ = build.resolve_config(tiny_config(**overrides))
  model = models.build_model(config.model, rngs=nnx.Rngs(params=3, dropout=1))
  _, params, feats, stats, _ = models.split(model)
  metrics.write_config(config, str(workdir))
  manager = checkpoints.make_manager(str(workdir), 2)
  checkpoints.save(
    manager,
    7,
    {'params': params, 'opt_state': {'mu': params}, 'projections': feats, 'stats': stats},
    {'step': 7},
  )
  manager.wait_until_finished()
  manager.close()
  return model


def test_restore_gives_the_saved_model_from_any_run_path(tmp_path):
  """restore.restore: the workdir, its checkpoints/ and checkpoints/<step> name the same
  run (checkpoints.locate's rule); anything else is one line naming what is expected."""
  from performer.training import checkpoints, restore  # pylint: disable=g-import-not-at-top

  saved = _save_run(tmp_path)
  tokens = jnp.asarray(random_tokens(0, (1, 10), 29))
  for path in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '7'):
    run = restore.restore(str(path))
    assert run.step == 7 and run.config.model.attention.kind == 'favor_softmax'
    np.testing.assert_allclose(
      np.asarray(run.model()(tokens)[0]), np.asarray(saved(tokens)[0]), atol=1e-6
    )
  for path, message in [
    (tmp_path / 'checkpoints' / '7' / 'params', 'no checkpoints directory'),
    (tmp_path / 'config.json', 'is a file; expected a workdir'),
    (tmp_path / 'nope', 'no such directory'),
  ]:
    with pytest.raises(checkpoints.CheckpointError, match=message):
      restore.restore(str(path))


def test_sample_cli_protein_fasta_and_errors(tmp_path):
  from conftest import run_script  # pylint: disable=g-import-not-at-top

  _save_run(tmp_path / 'run')
  out = tmp_path / 'samples.fasta'
  args = [
    'sample.py',
    f'--workdir={tmp_path / "run"}',
    '--prompt=mkta',
    '--num_samples=3',
    '--max_new_tokens=12',
    '--seed=5',
    '--top_k=10',
    f'--output={out}',
  ]
  proc = run_script(args, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # Progress and results only: no library chatter (jax's TPU probe, orbax's notes).
  assert proc.stderr.strip().splitlines() == [f'wrote 3 sample(s) from step 7 to {out}'], (
    proc.stderr
  )
  text = out.read_text()
  headers = [l for l in text.splitlines() if l.startswith('>')]
  assert len(headers) == 3 and all('seed=5' in h for h in headers)
  seqs = text.split('>')[1:]
  assert all(s.split('\n', 1)[1].replace('\n', '').startswith('MKTA') for s in seqs)
  proc = run_script(args[:-1] + ['--prompt=MK1TA'], timeout=120)
  assert proc.returncode == 2
  assert "invalid character '1' at position 2" in proc.stderr
  proc = run_script(args[:-1] + ['--prompt=' + 'A' * 70], timeout=120)
  assert proc.returncode == 2 and 'longer than the model max_len 64' in proc.stderr


@pytest.mark.slow
def test_sample_cli_image_png(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from conftest import run_script  # pylint: disable=g-import-not-at-top

  _save_run(
    tmp_path / 'run',
    model__task='image_ar',
    model__image_shape='(4,4,3)',
    model__max_len=48,
    model__vocab_size=256,
    model__positions='axial',
  )
  cond = np.random.RandomState(0).randint(0, 256, (4, 4, 3)).astype(np.uint8)
  Image.fromarray(cond).save(tmp_path / 'cond.png')
  out = tmp_path / 'samples.png'
  proc = run_script(
    [
      'sample.py',
      f'--checkpoint={tmp_path / "run/checkpoints/7"}',
      '--prompt=2',
      f'--image={tmp_path / "cond.png"}',
      '--num_samples=2',
      f'--output={out}',
    ],
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  grid = np.asarray(Image.open(out))
  assert grid.shape == (4, 2 * 4 + 2, 3)
  for i in range(2):  # the first two rows are the conditioning image's
    np.testing.assert_array_equal(grid[:2, i * 6 : i * 6 + 4], cond[:2])


@pytest.mark.slow
def test_decode_benchmark_quick(tmp_path):
  from conftest import run_script  # pylint: disable=g-import-not-at-top

  path = tmp_path / 'decode.json'
  proc = run_script(['benchmarks/decode.py', '--quick', '--json', str(path)], timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'ms/token' in proc.stdout
  result = json.loads(path.read_text())
  kinds = {r['kind'] for r in result['rows']}
  assert kinds == {'favor_softmax', 'softmax'}
  assert all(r['ms_per_token'] > 0 and r['cache_mib'] > 0 for r in result['rows'])
  # a hybrid whose linear part sees q, k before rotary positions (its ring keeps both)
  # and decays (the ring and the cache keep each key's index), far keys clamped, the
  # cache stored in bfloat16 and scored leaving one out
  args = ['--kinds', 'hedgehog', '--window', '8', '--sinks', '2', '--sparse_cache', '4']
  args += ['--sparse_cache_dtype', 'bfloat16', '--sparse_cache_leave_one_out']
  args += ['--linear_nope', '--linear_half_life', '64']
  args += ['--rope_clamp', '16']
  proc = run_script(['benchmarks/decode.py', '--quick', *args], timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  label = 'hedgehog+window 8+sinks 2+cache 4+bfloat16+leave-one-out+nope+half-life 64+clamp 16'
  assert label in proc.stdout


@pytest.mark.parametrize('kind', ['softmax', 'favor_softmax', 'favor_sharp'])
def test_llama_family_decode_equals_forward(kind):
  """A Llama-family model (RMSNorm, SwiGLU, RoPE, 4 query / 2 kv heads) decodes through
  the same forward with a cache: prefill and every step match the full pass; a softmax
  cache holds the kv heads, a linear kind's state is one (S, z) per query head."""
  cfg = dict(
    family='llama',
    vocab_size=VOCAB,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    emb_dim=32,
    mlp_dim=48,
    max_len=32,
    rope_theta=500.0,
    attention=dict(kind=kind, num_features=16, chunk_size=4),
  )
  model = models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  assert model.layers[0].attn.key.kernel.shape == (32, 2, 8)
  check_decode_matches_forward(model)
  cache = model.init_cache(1, 20)
  layer = cache['layers'][0]
  if kind == 'softmax':
    assert layer['k'].shape == (1, 20, 2, 8)
  else:
    assert layer['S'].shape == (1, 4, 16, 8)
