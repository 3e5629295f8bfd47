"""Context parallelism (#15): the state primitives on one device, then the length
split over a `seq` mesh axis of 8 forced CPU devices against one device, for
attention (outputs, gradients, decoding after a prefill) and for train.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_script, tiny_config
from performer import attention
from performer.attention import linear
from performer.training import config_utils, sharding

EIGHT = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'


def _random_state(rng, seg, b=2, h=2, m=3, d=4):
  return {
    'S': jnp.asarray(rng.normal(size=(b, h, m, d)), jnp.float32),
    'z': jnp.asarray(rng.uniform(size=(b, h, m)), jnp.float32),
    'M': jnp.asarray(rng.normal(size=(b, h)) * 5, jnp.float32),
    'seg': jnp.asarray(seg, jnp.int32),
  }


def test_combine_states_is_associative():
  rng = np.random.default_rng(0)
  # row 0: one segment throughout; row 1: a boundary between b and c
  a, b, c = (_random_state(rng, seg) for seg in ([0, 1], [0, 1], [0, 2]))
  left = linear.combine_states(linear.combine_states(a, b), c)
  right = linear.combine_states(a, linear.combine_states(b, c))
  for key in left:
    np.testing.assert_allclose(left[key], right[key], rtol=1e-6, atol=1e-6)
  # the boundary drops everything before it; the empty state is a left identity
  np.testing.assert_array_equal(left['S'][1], c['S'][1])
  empty = linear.empty_state(2, 2, 3, 4)
  for key, value in linear.combine_states(empty, a).items():
    np.testing.assert_array_equal(value, a[key])


def _features(seed, length=48, b=2, h=2, m=8, d=4):
  rng = np.random.default_rng(seed)
  qf = jnp.asarray(rng.uniform(size=(b, h, length, m)), jnp.float32)
  kf = jnp.asarray(rng.uniform(size=(b, h, length, m)), jnp.float32)
  kr = jnp.asarray(rng.normal(size=(b, h, length)) * 3, jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, h, length, d)), jnp.float32)
  seg = np.zeros((b, length), np.int32)
  seg[1] = np.repeat(np.arange(4), 13)[:length]  # boundaries at 13, 26, 39
  return qf, kf, kr, v, jnp.asarray(seg)


def test_chunked_prefill_continues_from_a_state():
  """Three pieces, each continuing from the state the last one returned (a boundary
  of row 1's segments falls inside the second piece, another on the cut at 39),
  equal one pass over the whole sequence."""
  qf, kf, kr, v, seg = _features(0)
  chunked = jax.jit(linear.causal_chunked, static_argnums=5, static_argnames='return_state')
  num, den = chunked(qf, kf, kr, v, seg, 8)
  whole = linear.normalise(num, den, 1e-6)
  state, pieces = None, []
  for lo, hi in ((0, 16), (16, 39), (39, 48)):
    cut = lambda x, a=2: jax.lax.slice_in_dim(x, lo, hi, axis=a)
    if state is not None:
      state['seg'] = seg[:, lo - 1]  # a state carries the segment it ends in
    num, den, state = chunked(
      cut(qf), cut(kf), cut(kr), cut(v), cut(seg, 1), 8, return_state=True, initial_state=state
    )
    pieces.append(linear.normalise(num, den, 1e-6))
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=2), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'kind, window, sinks',
  [
    pytest.param('favor_softmax', 0, 0, marks=pytest.mark.slow),
    ('hedgehog', 6, 0),
    ('softmax', 0, 0),
    ('favor_softmax', 6, 3),
  ],
)
def test_multi_turn_prefill_equals_one_prefill(kind, window, sinks):
  """Turns of 25, 3 (shorter than the window) and 12 tokens, each prefilled from the
  last one's state, then a decoding step: the same outputs as one prefill of all 40
  (softmax: each turn reads the KV cache the earlier ones wrote; sinks: held in the
  state after the first turn)."""
  attend = attention.get_attention(kind, num_features=16, chunk_size=8, window=window, sinks=sinks)
  proj = attend.make_projection(jax.random.PRNGKey(0), 8)
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 41, 2, 8)), jnp.float32) for _ in range(3))
  mask = jnp.ones((2, 41), bool).at[0, :4].set(False)  # row 0 left-padded
  fresh = attend.init_state(2, 2, 8, 8, projection=proj, max_length=41)
  once, state_once = attend.prefill(
    fresh, q[:, :40], k[:, :40], v[:, :40], projection=proj, mask=mask[:, :40]
  )
  state, outs = fresh, []
  for lo, hi in ((0, 25), (25, 28), (28, 40)):
    out, state = attend.prefill(
      state, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], projection=proj, mask=mask[:, lo:hi]
    )
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), once, rtol=1e-5, atol=1e-6)
  step = lambda st: attend.step(st, q[:, 40], k[:, 40], v[:, 40], projection=proj)[0]
  np.testing.assert_allclose(step(state), step(state_once), rtol=1e-5, atol=1e-6)


def _eight_device_parity(kinds, modes='all'):
  proc = run_script(
    ['tests/context_parallel_worker.py', ','.join(kinds), modes],
    timeout=900,
    XLA_FLAGS=EIGHT,
    JAX_PLATFORMS='cpu',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT'))
  result = json.loads(line[len('RESULT') :])
  raised = result.pop('raised', [])
  for name in raised:
    assert name.endswith('ValueError'), name
  for name, errors in result.items():
    # trig features' normaliser can come near zero: on one device, chunks of 4 and 8
    # already differ by 7e-5 there (rounding, not the split)
    tolerance = 2e-4 if name.startswith('favor_trig') else 1e-5
    for mesh, error in errors.items():
      assert error <= tolerance, (name, mesh, error)
  return dict(result, raised=raised)


def test_sinks_split_over_eight_devices_equal_one_device():
  """Hedgehog with a window of 6 and 4 sinks, causal: the sinks of the segment entering
  each device's span arrive in the all-gather-and-fold (a segment starting at 13 has
  its sinks on two devices); decoding after a sharded prefill. Bidirectional sinks
  under mesh.seq raise a ValueError, as does a sparse cache."""
  result = _eight_device_parity(['hedgehog:6:4'], modes='causal_segments')
  assert 'hedgehog:6:4/decode' in result and 'hedgehog:6:4/causal/segments' in result
  assert 'hedgehog:6:4/bidirectional/segments' not in result and len(result['raised']) == 2


def test_linear_nope_and_decay_split_over_eight_devices_equal_one_device():
  """The same with the feature map fed other q, k than the window and the sinks
  (`linear_nope`) and a decaying linear part (`linear_half_life`: each token's index
  counts the valid tokens before it over the whole row, across devices) and sinks past
  12 tokens scored at that distance (`rope_clamp`: query indices count from each
  segment's start): forward, gradients through both pairs, and decoding after a
  sharded prefill (the ring keeps both keys and their indices)."""
  spec = 'hedgehog:6:4:nope+decay+clamp'
  result = _eight_device_parity([spec], modes='causal_segments')
  assert f'{spec}/decode' in result and len(result['raised']) == 2


def test_sequence_split_over_eight_devices_equals_one_device():
  """Hedgehog with a window of 6 (the linear part's states folded forward and, for
  the bidirectional model, backward; the window's keys from the neighbouring
  devices): outputs and gradients with seq=8 and data=2 x seq=4, segments and
  padding crossing shard boundaries; decoding after a sharded prefill. (Padding
  alone, without segments, runs under -m slow.)"""
  result = _eight_device_parity(['hedgehog:6'], modes='segments')
  assert 'hedgehog:6/decode' in result and 'hedgehog:6/bidirectional/segments' in result


@pytest.mark.slow  # every kind without a window, FAVOR+ with one: ~5 min on 2 cores
def test_every_kind_splits_over_eight_devices():
  """Also the plain paths: (Z, z) summed across devices, packed bidirectional
  segments, prefill continued from a sharded prefill's state, gathered softmax."""
  done = ('identity',)
  _eight_device_parity([k for k in attention.KINDS if k not in done] + ['favor_softmax:6'])


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return [r['loss'] for r in rows if r.get('split') == 'train' and 'loss' in r]


def test_train_py_logs_the_same_losses_with_seq_4(tmp_path):
  args = ['--config=configs/tiny.py', '--progress=off', '--config.train.num_steps=6']
  args += ['--config.train.log_every=1', '--config.data.seq_len=64']
  runs = {'one': ('1', []), 'seq4': ('4', ['--config.mesh.seq=4'])}
  losses = {}
  for name, (devices, extra) in runs.items():
    workdir = str(tmp_path / name)
    flags = os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}'
    proc = run_script(
      ['train.py', *args, *extra, f'--workdir={workdir}'],
      timeout=600,
      XLA_FLAGS=flags,
      JAX_PLATFORMS='cpu',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'seq={devices}' in proc.stderr, proc.stderr[-3000:]
    losses[name] = _losses(workdir)
  assert len(losses['one']) == 6, losses
  np.testing.assert_allclose(losses['seq4'], losses['one'], rtol=1e-5)


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'mesh__seq': 3}, 'does not divide data.seq_len=64'),
    ({'mesh__seq': 8}, 'not a multiple of model.attention.chunk_size=16'),
    ({'mesh__seq': 4, 'model__attention__window': 20}, 'attention.window=20 is longer'),
    (
      {'mesh__seq': 4, 'model__attention__window': 4, 'model__attention__sparse_cache': 8},
      'sparse_cache runs its chunks in order',
    ),
  ],
)
def test_sequence_split_config_errors(overrides, message):
  with pytest.raises(config_utils.ConfigError, match=message):
    config_utils.validate(tiny_config(**overrides))


def test_mesh_must_use_every_device():
  config = tiny_config(mesh__data=2, mesh__seq=2)
  with pytest.raises(ValueError, match=r'data \* fsdp \* seq = 2 \* 1 \* 2 = 4 must equal'):
    sharding.make_mesh(config.mesh)
  mesh = sharding.make_mesh(tiny_config().mesh)
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1, 'seq': 1}
