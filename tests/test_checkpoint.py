"""Checkpoint tests: SIGKILL + resume is bitwise identical to an uninterrupted run, a
corrupt latest checkpoint falls back to the previous one, and init_from moves parameters
across attention kinds while naming any parameter present in only one model."""

import glob
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, subprocess_env, tiny_config
from performer.training import build, checkpoints, metrics, restore, rundir, train_lib
from performer.training.metrics import read_metrics

# Long enough (in steps) that a kill right after the first checkpoint lands mid-run.
KILL_ARGS = dict(
  train__num_steps=120,
  train__checkpoint_every=10,
  train__keep_checkpoints=3,
  train__eval_every=0,
  train__log_every=40,
  data__seq_len=32,
  model__max_len=32,
  train__redraw_every=7,
  model__dropout_rate=0.1,
)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _finalized_steps(workdir):
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
  killed_dir, ref_dir = str(tmp_path / 'killed'), str(tmp_path / 'reference')
  overrides = [f'--config.{k.replace("__", ".")}={v}' for k, v in KILL_ARGS.items()]
  proc = subprocess.Popen(
    [
      sys.executable,
      'train.py',
      '--config=configs/tiny.py',
      f'--workdir={killed_dir}',
      '--progress=off',
      *overrides,
    ],
    cwd=ROOT,
    env=subprocess_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  deadline = time.time() + 240
  while not _finalized_steps(killed_dir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
  done = _finalized_steps(killed_dir)
  assert done and max(done) < KILL_ARGS['train__num_steps'], done

  config = tiny_config(**KILL_ARGS)
  resumed = train_lib.train_and_evaluate(config, killed_dir)
  reference = train_lib.train_and_evaluate(config, ref_dir)
  assert resumed['step'] == reference['step'] == KILL_ARGS['train__num_steps']
  for a, b in zip(_leaves(resumed['params']), _leaves(reference['params'])):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  for a, b in zip(_leaves(resumed['projections']), _leaves(reference['projections'])):
    assert np.array_equal(a, b)
  assert resumed['final'] == reference['final']
  # The record reads like one run: rows the killed process logged after its checkpoint
  # were dropped on resume.
  steps = [r['step'] for r in read_metrics(killed_dir, 'train')]
  assert steps == sorted(set(steps)) == [r['step'] for r in read_metrics(ref_dir, 'train')]


def _corrupt(step_dir):
  """Truncates the largest array file of the params item, as a failing disk would."""
  files = glob.glob(os.path.join(step_dir, 'params', '**', 'd', '*'), recursive=True)
  big = max(files, key=os.path.getsize)
  with open(big, 'r+b') as f:
    f.truncate(os.path.getsize(big) // 2)


@pytest.mark.slow
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
  workdir = str(tmp_path)
  config = tiny_config(
    train__num_steps=4,
    train__checkpoint_every=2,
    train__eval_every=0,
    data__seq_len=32,
    model__max_len=32,
  )
  first = train_lib.train_and_evaluate(config, workdir)
  assert _finalized_steps(workdir) == [2, 4]
  _corrupt(os.path.join(workdir, 'checkpoints', '4'))
  # A partial save from a killed process: orbax's tmp dir, never a finalized step.
  os.makedirs(os.path.join(workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1234', 'params'))

  with caplog.at_level(logging.WARNING):
    again = train_lib.train_and_evaluate(config, workdir)
  assert any('checkpoint step 4 is corrupt' in r.getMessage() for r in caplog.records)
  assert os.listdir(os.path.join(workdir, 'checkpoints_corrupt'))
  assert _finalized_steps(workdir) == [2, 4]  # step 4 re-trained from 2 and saved again
  assert not [d for d in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in d]
  # Training from step 2 reproduces the lost step 4 exactly.
  for a, b in zip(_leaves(first['params']), _leaves(again['params'])):
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_init_from_across_attention_kinds(tmp_path, caplog):
  source = str(tmp_path / 'softmax')
  base = dict(
    train__num_steps=2,
    train__checkpoint_every=2,
    train__eval_every=0,
    data__seq_len=32,
    model__max_len=32,
  )
  src = train_lib.train_and_evaluate(tiny_config(model__attention__kind='softmax', **base), source)

  # Same architecture, other kind: every parameter transfers, nothing is reported missing.
  config = tiny_config(model__attention__kind='favor_relu', **base)
  run = build.setup(config)
  sh = run.model.shardings['params']
  params, report = checkpoints.load_params_by_name(source, run.model.params, sh)
  assert report['only_in_checkpoint'] == [] and report['only_in_model'] == []
  for a, b in zip(_leaves(params), _leaves(src['params'])):
    assert np.array_equal(a, b)
  assert jax.tree.leaves(run.model.projections), 'favor_relu draws its own features'

  # A deeper model: the extra layer is named, keeps its fresh init, and a warning says so.
  deeper = tiny_config(model__attention__kind='favor_softmax', model__num_layers=3, **base)
  run3 = build.setup(deeper)
  with caplog.at_level(logging.WARNING):
    _, report = checkpoints.load_params_by_name(
      os.path.join(source, 'checkpoints', '2'),
      run3.model.params,
      run3.model.shardings['params'],
    )
  assert report['only_in_model'] and all(n.startswith('layers.2.') for n in report['only_in_model'])
  assert report['only_in_checkpoint'] == []
  assert any('layers.2.' in r.getMessage() for r in caplog.records)

  # Through the training loop (shallower model: checkpoint-only names are reported).
  shallow = tiny_config(
    model__attention__kind='favor_softmax', model__num_layers=1, train__init_from=source, **base
  )
  result = train_lib.train_and_evaluate(shallow, str(tmp_path / 'shallow'))
  assert result['init_report']['only_in_checkpoint']
  assert all(n.startswith('layers.1.') for n in result['init_report']['only_in_checkpoint'])

  wider = tiny_config(model__mlp_dim=128, **base)
  run_w = build.setup(wider)
  with pytest.raises(checkpoints.InitFromError, match='shape mismatch'):
    checkpoints.load_params_by_name(source, run_w.model.params, run_w.model.shardings['params'])


def test_data_position_restore():
  """grain iterators restore their saved state; plain iterators replay `step` batches."""
  it = iter(range(100))
  train_lib._restore_data_position(it, {}, 7)  # pylint: disable=protected-access
  assert next(it) == 7

  class Stateful:
    def __init__(self):
      self.i = 0

    def __next__(self):
      self.i += 1
      return self.i

    def set_state(self, state):
      self.i = state['i']

  it = Stateful()
  train_lib._restore_data_position(it, {'data_state': {'i': 41}}, 3)  # pylint: disable=protected-access
  assert next(it) == 42


def _saved_run(workdir, **overrides):
  """A workdir as training leaves it: config.json and one checkpoint (step 3)."""
  config, _ = build.resolve_config(tiny_config(**overrides))
  state = build.create_state(config, restore.one_device_mesh(), init='eager')
  metrics.write_config(config, workdir)
  manager = checkpoints.make_manager(workdir, 1)
  trees = {'params': state.params, 'projections': state.projections, 'stats': state.stats}
  checkpoints.save(manager, 3, trees, {'step': 3})
  manager.wait_until_finished()
  manager.close()
  return state


def test_restore_keeps_the_init_of_parameters_an_eval_option_adds(tmp_path, capsys):
  """An existing run evaluated with attention sinks gains their zero-initialised gains,
  with one line on stderr; any other difference from the run is still a mismatch."""
  workdir = str(tmp_path)
  saved = checkpoints.flatten(_saved_run(workdir).params)
  with_sinks = build.resolve_config(tiny_config(model__attention__sinks=4))[0]
  run = restore.restore(workdir, with_sinks)
  assert run.step == 3 and run.config.model.attention.sinks == 4
  restored = checkpoints.flatten(run.state.params)
  added = sorted(set(restored) - set(saved))
  assert added and all(name.endswith('sink_log_gain') for name in added), added
  for name in added:
    np.testing.assert_array_equal(restored[name], 0)
  for name in saved:
    np.testing.assert_array_equal(restored[name], saved[name])
  notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith('note:')]
  assert len(notes) == 1 and 'keep their initial values' in notes[0], notes
  assert 'sink_log_gain' in notes[0]
  assert len(restore.restore(workdir).state.new_params) < len(run.state.new_params)
  for other in (dict(model__num_layers=3), dict(model__mlp_dim=96)):
    config = build.resolve_config(tiny_config(model__attention__sinks=4, **other))[0]
    with pytest.raises(checkpoints.CheckpointMismatchError, match='another model'):
      restore.restore(workdir, config)


def test_restore_with_a_longer_window_reads_the_same_parameters(tmp_path, capsys):
  """The window's length is an evaluation-time key: a hybrid run read with a longer
  window has exactly its parameters (the gain is per head, whatever the length)."""
  workdir = str(tmp_path)
  saved = checkpoints.flatten(_saved_run(workdir, model__attention__window=4).params)
  longer = build.resolve_config(tiny_config(model__attention__window=8))[0]
  assert rundir.check_config(longer, workdir, 'hint', rundir.EVAL_KEYS) == []
  run = restore.restore(workdir, longer)
  assert run.config.model.attention.window == 8
  restored = checkpoints.flatten(run.state.params)
  assert sorted(restored) == sorted(saved)
  for name in saved:
    np.testing.assert_array_equal(restored[name], saved[name])
  assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith('note:')]
