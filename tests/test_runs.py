"""performer.training.runs: settings from the environment and cached runs.

train_and_evaluate is replaced by a fake that only writes metrics rows, so these tests
check the caching (what counts as finished) without training anything.
"""

import os

import pytest

from conftest import ROOT
from performer.training import metrics, runs, train_lib


def test_from_env_quick_and_full(tmp_path):
  quick = runs.NotebookRuns.from_env(
    {'PERFORMER_NOTEBOOK_QUICK': '1', 'PERFORMER_NOTEBOOK_WORKDIR': str(tmp_path)}
  )
  assert quick.quick and quick.tag == 'quick' and quick.work == str(tmp_path)
  assert 'train.num_steps=30' in quick.overrides
  assert quick.workdir('protein_favor') == os.path.join(str(tmp_path), 'protein_favor_quick')
  full = runs.NotebookRuns.from_env({'PERFORMER_NOTEBOOK_WORKDIR': str(tmp_path)})
  assert not full.quick and full.tag == 'full' and 'train.num_steps=150' in full.overrides
  default = runs.NotebookRuns.from_env({})  # no workdir: a fresh temporary folder
  assert os.path.isdir(default.work)
  os.rmdir(default.work)


def test_config_applies_shared_then_own_overrides(tmp_path):
  settings = runs.NotebookRuns(quick=True, work=str(tmp_path), overrides=('train.num_steps=7',))
  assert settings.config_dir == os.path.join(ROOT, 'configs')
  assert settings.config('tiny.py').train.num_steps == 7
  config = settings.config('tiny.py', ['train.num_steps=3', 'model.emb_dim=16'])
  assert (config.train.num_steps, config.model.emb_dim) == (3, 16)


def _write(workdir, rows):
  writer = metrics.MetricWriter(workdir, enable_tensorboard=False)
  for step, split, values in rows:
    writer.write(step, split, values)
  writer.close()


@pytest.fixture
def fake_training(monkeypatch):
  """Replaces train_and_evaluate; returns the list of (num_steps, workdir) it was called with."""
  calls = []

  def fake(config, workdir, progress=None):
    assert progress is False
    n = config.train.num_steps
    calls.append((n, workdir))
    _write(
      workdir,
      [
        (n // 2, 'validation', {'accuracy': 0.1}),
        (n, 'final_validation', {'accuracy': 0.2, 'loss': 1.0}),
      ],
    )

  monkeypatch.setattr(train_lib, 'train_and_evaluate', fake)
  return calls


def test_train_reuses_a_finished_run(tmp_path, fake_training):
  settings = runs.NotebookRuns(
    quick=True, work=str(tmp_path), overrides=('train.num_steps=4',), tag='quick'
  )
  workdir = settings.train('tiny', 'tiny.py')
  assert workdir == os.path.join(str(tmp_path), 'tiny_quick')
  assert fake_training == [(4, workdir)]
  assert settings.train('tiny', 'tiny.py') == workdir  # finished: not trained again
  assert len(fake_training) == 1
  # A different num_steps is not that run: trained (resumed) to the new length.
  settings.train('tiny', 'tiny.py', ['train.num_steps=6'])
  assert fake_training[-1] == (6, workdir)
  assert runs.is_finished(workdir, 4) and runs.is_finished(workdir, 6)


def test_unfinished_run_is_trained(tmp_path, fake_training):
  settings = runs.NotebookRuns(quick=False, work=str(tmp_path), overrides=('train.num_steps=4',))
  _write(settings.workdir('tiny'), [(2, 'validation', {'accuracy': 0.1})])  # interrupted
  assert not runs.is_finished(settings.workdir('tiny'), 4)
  settings.train('tiny', 'tiny.py')
  assert len(fake_training) == 1


def test_final_metrics_and_curve(tmp_path):
  workdir = str(tmp_path / 'run')
  assert runs.final_metrics(workdir) is None and runs.curve(workdir) == ([], [])
  _write(
    workdir,
    [
      (10, 'train', {'accuracy': 0.05, 'loss': 3.0}),
      (10, 'validation', {'accuracy': 0.1, 'loss': 2.5}),
      (20, 'validation', {'accuracy': 0.3, 'loss': 2.0}),
      (20, 'final_validation', {'accuracy': 0.35, 'loss': 1.9}),
      (20, 'final_test', {'accuracy': 0.33, 'loss': 1.95}),
    ],
  )
  assert runs.final_metrics(workdir)['accuracy'] == pytest.approx(0.35)
  assert runs.final_metrics(workdir, 'test')['step'] == 20
  assert runs.curve(workdir) == ([10, 20, 20], [0.1, 0.3, 0.35])
  assert runs.curve(workdir, 'loss')[1] == [2.5, 2.0, 1.9]
