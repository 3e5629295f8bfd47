"""Interrupts save their work, and no command quietly loses a run (slow: each case trains).

* SIGTERM or SIGINT in the middle of a run, and in the middle of a save: train.py finishes
  the step, saves, prints one line and exits 143 / 130; resuming ends bitwise equal to an
  uninterrupted run, with no duplicated metrics rows. A second Ctrl-C aborts at once and
  the run still resumes from its newest complete checkpoint.
* While a run trains, a second train.py on its workdir exits 2 with one line.
* The favor_relu example of docs/training.md: eval.py without --config scores it as training did; a
  --config that differs is refused; raising num_steps without --config resumes.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, run_script, subprocess_env, tiny_config
from performer.training import train_lib
from performer.training.metrics import read_metrics

pytestmark = pytest.mark.slow

ARGS = dict(  # as test_checkpoint's kill test: long enough to interrupt mid-run
  train__num_steps=120,
  train__checkpoint_every=10,
  train__keep_checkpoints=3,
  train__eval_every=0,
  train__log_every=20,
  data__seq_len=32,
  model__max_len=32,
  train__redraw_every=7,
  model__dropout_rate=0.1,
)
FLAGS = ['--config=configs/tiny.py', '--progress=off'] + [
  f'--config.{k.replace("__", ".")}={v}' for k, v in ARGS.items()
]
LINE = re.compile(r'interrupted at step (\d+); checkpoint saved; run the same command to resume')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  return train_lib.train_and_evaluate(tiny_config(**ARGS), str(tmp_path_factory.mktemp('ref')))


def _steps(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _start(args, workdir):
  return subprocess.Popen(
    [sys.executable, *args, f'--workdir={workdir}'],
    cwd=ROOT,
    env=subprocess_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def _interrupted_step(proc, signum):
  """The step of the one line the interrupted process printed last; no traceback."""
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signum, (proc.returncode, stderr[-3000:])
  assert 'Traceback' not in stderr, stderr[-3000:]
  match = LINE.fullmatch(stderr.strip().splitlines()[-1])
  assert match, stderr[-2000:]
  return int(match.group(1))


def _resume_and_compare(workdir, reference, saved_step=None):
  if saved_step is not None:
    assert max(_steps(workdir)) == saved_step
  resumed = train_lib.train_and_evaluate(tiny_config(**ARGS), workdir)
  assert resumed['step'] == reference['step'] == ARGS['train__num_steps']
  for name in ('params', 'projections'):
    for a, b in zip(jax.tree.leaves(resumed[name]), jax.tree.leaves(reference[name])):
      assert np.array_equal(np.asarray(a), np.asarray(b)), name
  assert resumed['final'] == reference['final']
  rows = [(r['step'], r['split']) for r in read_metrics(workdir)]
  assert len(rows) == len(set(rows)), rows  # no step logged twice


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_saves_and_resumes_bitwise(tmp_path, reference, signum):
  workdir = str(tmp_path / 'run')
  proc = _start(['train.py', *FLAGS], workdir)
  lock, deadline = os.path.join(workdir, '.lock'), time.time() + 240
  while not (os.path.exists(lock) and open(lock).read()) and time.time() < deadline:
    time.sleep(0.05)
  if signum == signal.SIGTERM:  # one writer per workdir: a second train.py is refused
    second = run_script(['train.py', *FLAGS, f'--workdir={workdir}'], timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.strip().splitlines() == [
      f'error: --workdir {workdir} is being trained by pid {proc.pid} on {os.uname().nodename}; '
      'wait for it to finish or stop it (it saves and exits on Ctrl-C or SIGTERM), or use '
      'another --workdir'
    ]
  while not _steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signum)
  step = _interrupted_step(proc, signum)
  assert 0 < step < ARGS['train__num_steps']
  assert open(lock).read() == ''  # released
  _resume_and_compare(workdir, reference, saved_step=step)


@pytest.mark.parametrize('signals', ['TERM', 'INT'])
def test_signal_mid_save_saves_and_resumes_bitwise(tmp_path, reference, signals):
  workdir = str(tmp_path / 'run')
  proc = _start(['tests/interrupt_worker.py', '20', signals, *FLAGS], workdir)
  assert _interrupted_step(proc, getattr(signal, f'SIG{signals}')) == 20
  _resume_and_compare(workdir, reference, saved_step=20)


def test_second_ctrl_c_aborts_and_keeps_the_newest_complete_checkpoint(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  proc = _start(['tests/interrupt_worker.py', '20', 'INT,INT', *FLAGS], workdir)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGINT, (proc.returncode, stderr[-3000:])
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert _steps(workdir)[-1] in (10, 20)  # 20 only if its write finished first
  _resume_and_compare(workdir, reference)


def test_favor_relu_example_is_the_runs_own(tmp_path):
  """docs/training.md: train favor_relu by override; eval.py and train.py then use its config."""
  workdir = str(tmp_path)
  args = ['--config.model.attention.kind=favor_relu', '--config.train.num_steps=4']
  trained = run_script(['train.py', '--config=configs/tiny.py', f'--workdir={workdir}', *args])
  assert trained.returncode == 0, trained.stderr[-3000:]
  table = trained.stdout[trained.stdout.index('== causal_lm') :]
  assert 'favor_relu' in table.splitlines()[0]

  evaluated = run_script(['eval.py', f'--workdir={workdir}'])
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert evaluated.stdout == table  # the training summary, to the last digit

  other = run_script(['eval.py', '--config=configs/tiny.py', f'--workdir={workdir}'])
  assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
  assert "model.attention.kind (run: 'favor_relu', now: 'favor_softmax')" in other.stderr

  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  resumed = run_script(['train.py', f'--workdir={workdir}', '--config.train.num_steps=6'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming with a new schedule: train.num_steps 4 -> 6' in resumed.stderr
  assert '/ favor_relu / protein_sample after 6 steps' in resumed.stdout
  assert before == ['4'] and _steps(workdir) == [5, 6]  # keep_checkpoints=2
