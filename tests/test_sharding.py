"""Sharding tests: parameter specs, and 8 CPU devices (mesh data=4 x fsdp=2, data=8, and
data=2 x seq=4) giving the same losses (and feature-map statistics) as 1 device over
several steps."""

import json
import os
import textwrap

import pytest

from conftest import run_script

# Runs in a fresh process: the device count is fixed when JAX starts.
EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, 'tests')
    import jax, jax.numpy as jnp
    from conftest import tiny_config
    from performer import data
    from performer.training import sharding, train_lib
    assert jax.device_count() == 8, jax.devices()
    kinds, meshes = sys.argv[1].split(','), sys.argv[2].split(',')
    out = {kind: {} for kind in kinds}
    shapes = {'1': (1, 1, 1), '4x2': (4, 2, 1), '8': (8, 1, 1), '2xseq4': (2, 1, 4)}
    for kind, (name, (d, f, s)) in ((kind, mesh) for kind in kinds for mesh in shapes.items()):
      if name not in meshes:
        continue
      config = tiny_config(mesh__data=d, mesh__fsdp=f, mesh__seq=s, train__batch_size=8,
                           data__seq_len=32, model__num_layers=1, model__attention__kind=kind,
                           model__attention__chunk_size=8, model__max_len=32,
                           model__dropout_rate=0.1, train__grad_accum_steps=2)
      mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:d * f * s])
      run = build.setup(config, mesh=mesh)
      st = run.model
      opt = jax.jit(run.tx.init, out_shardings=st.shardings['opt_state'])(st.params)
      state = st.train_state(0, opt)
      it = data.build_dataset(run.config.data, split='train', batch_size=8, seed=0)
      losses = []
      for step in range(4):
        batch = sharding.global_batch(next(it), run.batch_sharding)
        state, m = run.train_fn(state, batch, run.keys['train'])
        losses.append(float(m['loss']))
      params, stats = state.params, state.stats
      specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(params)})
      out[kind][name] = {'losses': losses, 'devices': len(run.mesh.devices.flat), 'specs': specs,
                   'stats': [float(jnp.sum(x)) for x in jax.tree.leaves(stats)]}
    print('RESULT' + json.dumps(out))
""")


def _eight_devices(kinds, meshes):
  proc = run_script(
    ['-c', EIGHT_DEVICES, ','.join(kinds), ','.join(meshes)],
    timeout=300,
    XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8',
    JAX_PLATFORMS='cpu',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT'))
  return json.loads(line[len('RESULT') :])


@pytest.mark.slow  # ~2 min of compiles on 2 cores; -m slow runs it
def test_adaptive_and_learned_maps_on_eight_devices():
  """FAVOR++, FAVOR# (running statistics) and Hedgehog (trained maps): same losses and
  statistics on a data=4 x fsdp=2 mesh as on one device."""
  kinds = ['favor_plus_plus', 'favor_sharp', 'hedgehog']
  for kind, out in _eight_devices(kinds, ['1', '4x2']).items():
    assert out['4x2']['devices'] == 8
    for a, b in zip(out['1']['losses'], out['4x2']['losses']):
      assert abs(a - b) <= 1e-5, (kind, out)
    assert len(out['1']['stats']) == (2 if kind != 'hedgehog' else 0)
    for a, b in zip(out['1']['stats'], out['4x2']['stats']):
      assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (kind, out)


@pytest.mark.slow
def test_eight_devices_match_one_device():
  out = _eight_devices(['favor_softmax'], ['1', '4x2', '8', '2xseq4'])['favor_softmax']
  assert out['1']['devices'] == 1 and out['4x2']['devices'] == 8 and out['8']['devices'] == 8
  assert out['2xseq4']['devices'] == 8
  assert any("'fsdp'" in s for s in out['4x2']['specs'])  # parameters really are sharded
  assert all("'fsdp'" not in s for s in out['8']['specs'])
  for name in ('4x2', '8', '2xseq4'):
    for a, b in zip(out['1']['losses'], out[name]['losses']):
      assert abs(a - b) <= 1e-5, (name, out)


def test_param_spec_shards_largest_divisible_dim():
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from performer.training import sharding  # pylint: disable=g-import-not-at-top

  assert sharding.param_spec((32, 64), 2) == P(None, 'fsdp')
  assert sharding.param_spec((64, 32), 2) == P('fsdp', None)
  assert sharding.param_spec((29, 32), 2) == P(None, 'fsdp')
  assert sharding.param_spec((29, 31), 2) == P()
  assert sharding.param_spec((), 2) == P()
  assert sharding.param_spec((64, 32), 1) == P()


def test_distributed_env_detection(monkeypatch):
  from performer.training import sharding  # pylint: disable=g-import-not-at-top

  for var in (
    'JAX_COORDINATOR_ADDRESS',
    'JAX_NUM_PROCESSES',
    'JAX_PROCESS_ID',
    'SLURM_JOB_ID',
    'SLURM_NTASKS',
    'OMPI_MCA_orte_hnp_uri',
    'TPU_WORKER_HOSTNAMES',
  ):
    monkeypatch.delenv(var, raising=False)
  assert sharding._distributed_env() is None
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert sharding._distributed_env() == {
    'coordinator_address': '10.0.0.1:1234',
    'num_processes': 4,
    'process_id': 3,
  }
