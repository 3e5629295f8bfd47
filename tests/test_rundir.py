"""A workdir belongs to one run: its config.json is the run's config (only schedule keys may
change on resume), one process trains it at a time (a lock), and a restart before the first
checkpoint leaves no duplicated metrics. In-process checks plus a few seconds-long CLI ones;
the interrupted and resumed runs are in test_interrupts.py."""

import json
import logging
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import run_script, tiny_config
from performer.training import build, checkpoints, interrupts, metrics, rundir

FAVOR_RELU = dict(model__attention__kind='favor_relu', train__num_steps=4)


def _run_dir(path, checkpoint=True, **overrides):
  """A workdir as training leaves it: config.json (resolved) and, optionally, a step dir."""
  config = build.resolve_config(tiny_config(**{**FAVOR_RELU, **overrides}))[0]
  metrics.write_config(config, str(path))
  if checkpoint:
    os.makedirs(path / 'checkpoints' / '4' / 'params')
    (path / 'checkpoints' / '4' / 'params' / 'data').write_bytes(b'healthy')
  return config


def test_config_json_round_trips(tmp_path):
  config = _run_dir(tmp_path)
  stored = rundir.load_config(str(tmp_path))
  assert stored.model.attention.kind == 'favor_relu' and stored.model.vocab_size == 29
  assert isinstance(stored.model.image_shape, tuple)
  assert rundir.differences(stored, config) == ([], [])
  assert rundir.load_config(str(tmp_path / 'new')) is None
  (tmp_path / 'config.json').write_text('{"model": ')
  with pytest.raises(rundir.RunConfigError, match='unreadable run config'):
    rundir.load_config(str(tmp_path))


def test_only_schedule_keys_may_change(tmp_path, caplog):
  _run_dir(tmp_path)
  other = build.resolve_config(tiny_config(**{**FAVOR_RELU, 'model__num_layers': 3}))[0]
  with pytest.raises(rundir.RunConfigError) as info:
    rundir.check_resume(other, str(tmp_path))
  assert 'model.num_layers (run: 2, now: 3)' in str(info.value) and '\n' not in str(info.value)
  softmax = build.resolve_config(tiny_config(train__num_steps=4))[0]  # the docs' pitfall
  with pytest.raises(rundir.RunConfigError, match="kind \\(run: 'favor_relu', now: 'favor_soft"):
    rundir.check_resume(softmax, str(tmp_path))
  longer = build.resolve_config(tiny_config(**{**FAVOR_RELU, 'train__num_steps': 8}))[0]
  with caplog.at_level(logging.INFO):
    assert rundir.check_resume(longer, str(tmp_path)) == [('train.num_steps', 4, 8)]
  assert any('train.num_steps 4 -> 8' in r.getMessage() for r in caplog.records)
  # config.json but no checkpoint: nothing to resume, the new config starts over.
  assert rundir.check_resume(other, str(tmp_path / 'x')) == []
  _run_dir(tmp_path / 'fresh', checkpoint=False)
  assert rundir.check_resume(other, str(tmp_path / 'fresh')) == []


def test_newer_keys_and_evaluation_ablations(tmp_path):
  """A key the run's config.json predates counts at its neutral default; eval.py and
  sample.py accept the window_off ablation, train.py does not."""
  config = build.resolve_config(tiny_config(model__attention__window=4))[0]
  stored = rundir.load_config(str(_write_config(tmp_path, config, drop='time_limit_minutes')))
  assert rundir.differences(stored, config) == ([], [])
  filled = rundir.load_config(str(tmp_path), schema=tiny_config())
  assert filled.train.time_limit_minutes == 0 and filled.model.attention.window == 4
  ablated = build.resolve_config(
    tiny_config(model__attention__window=4, model__attention__window_off=True)
  )[0]
  key = 'model.attention.window_off'
  assert rundir.differences(stored, ablated)[0] == [(key, False, True)]
  assert rundir.check_config(ablated, str(tmp_path), 'hint', rundir.EVAL_KEYS) == []
  with pytest.raises(rundir.RunConfigError, match='window_off'):
    rundir.check_config(ablated, str(tmp_path), 'hint')
  # the context held-out text is scored at is an evaluation choice too
  shorter = build.resolve_config(tiny_config(model__attention__window=4, data__seq_len=8))[0]
  assert rundir.check_config(shorter, str(tmp_path), 'hint', rundir.EVAL_KEYS) == []
  with pytest.raises(rundir.RunConfigError, match='seq_len'):
    rundir.check_config(shorter, str(tmp_path), 'hint')


def _write_config(folder, config, drop):
  raw = json.loads(config.to_json_best_effort())
  del raw['train'][drop]
  (folder / rundir.CONFIG_FILE).write_text(json.dumps(raw))
  return folder


def test_train_under_another_config_exits_2_and_touches_nothing(tmp_path):
  _run_dir(tmp_path)
  before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
  proc = run_script(['train.py', '--config=configs/default.py', f'--workdir={tmp_path}'])
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in proc.stderr
  assert 'model.attention.kind' in lines[0] and 'model.emb_dim' in lines[0], lines[0]
  after = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file() and p.name != '.lock'}
  assert after == before and not (tmp_path / 'checkpoints_corrupt').exists()


def test_lock_excludes_a_second_writer_and_takes_over_a_stale_one(tmp_path, caplog):
  workdir = str(tmp_path)
  with rundir.lock(workdir) as path:
    assert open(path).read().split()[0] == str(os.getpid())
    with pytest.raises(rundir.WorkdirLockedError, match=f'being trained by pid {os.getpid()}'):
      with rundir.lock(workdir):
        pass
    # train.py on a locked workdir: one line, exit 2, before anything is built.
    proc = run_script(['train.py', '--config=configs/tiny.py', f'--workdir={workdir}'])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
      f'error: --workdir {workdir} is being trained by pid {os.getpid()} on '
      f'{open(path).read().split()[1]}; wait for it to finish or stop it (it saves and exits '
      'on Ctrl-C or SIGTERM), or use another --workdir'
    ]
  assert open(path).read() == ''  # released: emptied, not deleted
  child = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], check=True,
                         capture_output=True, text=True)  # fmt: skip
  dead = child.stdout.strip()  # a pid that no longer runs
  with open(path, 'w') as f:
    f.write(f'{dead} somehost\n')  # left by a killed process
  with caplog.at_level(logging.WARNING), rundir.lock(workdir):
    assert open(path).read().split()[0] == str(os.getpid())
  assert any(f'stale lock of pid {dead}' in r.getMessage() for r in caplog.records)


def test_metrics_have_no_duplicated_steps_after_a_restart(tmp_path):
  workdir = str(tmp_path)
  for _ in range(2):  # killed before its first checkpoint, then started again
    writer = metrics.MetricWriter(workdir, start_step=0, enable_tensorboard=False)
    for step in (5, 10):
      writer.write(step, 'train', {'loss': 1.0})
    writer.close()
  steps = [r['step'] for r in metrics.read_metrics(workdir)]
  assert steps == [5, 10]
  writer = metrics.MetricWriter(workdir, start_step=5, enable_tensorboard=False)  # resumed at 5
  writer.write(10, 'train', {'loss': 2.0})
  writer.write(10, 'final_test', {'loss': 2.5})
  writer.close()
  assert [(r['step'], r['loss']) for r in metrics.read_metrics(workdir)] == [
    (5, 1.0),
    (10, 2.0),
    (10, 2.5),
  ]
  writer = metrics.MetricWriter(workdir, start_step=10, enable_tensorboard=False)  # rerun
  writer.write(10, 'final_test', {'loss': 2.5})  # its final evaluation, once
  writer.close()
  assert [r['split'] for r in metrics.read_metrics(workdir)] == ['train', 'train', 'final_test']


def test_first_signal_is_recorded_and_the_second_does_what_it_did_before():
  previous = signal.getsignal(signal.SIGINT)
  with interrupts.catching() as stop:
    assert not stop.pending()
    with interrupts.catching() as inner:  # nested: one shared Stop
      assert inner is stop
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.pending() and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is previous  # a second signal is not caught
  assert signal.getsignal(signal.SIGINT) is previous
  error = interrupts.Interrupted(signal.SIGINT, 7)
  assert str(error) == 'interrupted at step 7; checkpoint saved; run the same command to resume'
  assert error.exit_status == 130 and interrupts.Interrupted(signal.SIGTERM, 1).exit_status == 143


def test_a_checkpoint_of_another_model_is_not_corrupt(tmp_path):
  manager = checkpoints.make_manager(str(tmp_path), 2)
  checkpoints.save(manager, 4, {'params': {'w': np.zeros(3, np.float32)}}, {'step': 4})
  manager.wait_until_finished()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for name, shape in (('w', (5,)), ('v', (3,))):
    template = {'params': {name: jax.ShapeDtypeStruct(shape, np.float32)}}
    with pytest.raises(checkpoints.CheckpointMismatchError, match='another model') as info:
      checkpoints.restore_latest(manager, template, {'params': {name: device}})
    assert ('shape of w: (3,) saved, (5,) now' if name == 'w' else "only in the model: ['v']") in (
      str(info.value)
    )
  manager.close()
  assert os.listdir(tmp_path / 'checkpoints') == ['4']
  assert not (tmp_path / 'checkpoints_corrupt').exists()
