"""Cached training runs shared by notebooks and scripts.

Notebooks 3-5 train the same small protein models (notebook 4 fine-tunes notebook 3's
Transformer, notebook 5 samples from its Performer), so they share one settings object and
one work folder instead of each training its own copy. A run of `name` lives in
`<work>/<name>_<tag>`; a finished run, recognised by its `final_validation` metrics row at
the configured `train.num_steps`, is reused, not retrained. An unfinished one is resumed from
its checkpoints, if any, by `train_and_evaluate`.

    from performer.training import runs
    RUNS = runs.NotebookRuns.from_env()   # PERFORMER_NOTEBOOK_QUICK, _WORKDIR
    workdir = RUNS.train('protein_favor', 'default.py')
    print(runs.final_metrics(workdir)['accuracy'])
"""

import dataclasses
import os
import tempfile

from performer.training import config_utils, metrics, train_lib

QUICK_ENV = 'PERFORMER_NOTEBOOK_QUICK'  # '1': tiny models, 30 steps (a smoke test)
WORKDIR_ENV = 'PERFORMER_NOTEBOOK_WORKDIR'  # where runs are cached (default: a temp folder)
# The repository's configs/, beside the package (config files are not installed with it).
CONFIG_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs'
)

QUICK_OVERRIDES = (
  'model.num_layers=1',
  'model.emb_dim=64',
  'model.mlp_dim=128',
  'model.max_len=64',
  'model.attention.num_features=32',
  'model.attention.chunk_size=32',
  'data.seq_len=64',
  'train.batch_size=8',
  'train.num_steps=30',
  'train.warmup_steps=5',
  'train.log_every=10',
  'train.eval_every=10',
  'train.eval_batches=0',
  'train.checkpoint_every=0',
)
FULL_OVERRIDES = (
  'train.num_steps=150',
  'train.warmup_steps=15',
  'train.log_every=50',
  'train.eval_every=50',
  'train.eval_batches=0',
  'train.checkpoint_every=0',
)


@dataclasses.dataclass(frozen=True)
class NotebookRuns:
  """Settings every run shares: `overrides` apply to every config, `tag` names the folders
  (so quick and full runs never mix), and runs are cached under `work`."""

  quick: bool
  work: str
  overrides: tuple = ()
  tag: str = 'full'
  config_dir: str = CONFIG_DIR

  @classmethod
  def from_env(cls, environ=None):
    """The settings from PERFORMER_NOTEBOOK_QUICK and PERFORMER_NOTEBOOK_WORKDIR."""
    environ = os.environ if environ is None else environ
    quick = environ.get(QUICK_ENV, '0') == '1'
    work = environ.get(WORKDIR_ENV) or tempfile.mkdtemp(prefix='performer_nb_')
    return cls(
      quick=quick,
      work=work,
      overrides=QUICK_OVERRIDES if quick else FULL_OVERRIDES,
      tag='quick' if quick else 'full',
    )

  def config(self, config_file, overrides=()):
    """configs/<config_file> (or a path) with the shared overrides, then `overrides`."""
    return config_utils.load_config(
      os.path.join(self.config_dir, config_file), list(self.overrides) + list(overrides)
    )

  def workdir(self, name):
    return os.path.join(self.work, f'{name}_{self.tag}')

  def train(self, name, config_file, overrides=()):
    """Trains config_file in workdir(name) unless a finished run is there; returns it."""
    config = self.config(config_file, overrides)
    workdir = self.workdir(name)
    if not is_finished(workdir, config.train.num_steps):
      train_lib.train_and_evaluate(config, workdir, progress=False)
    return workdir


def is_finished(workdir, num_steps):
  """Whether workdir holds a run that finished (final validation) at `num_steps`."""
  return any(r['step'] == num_steps for r in metrics.read_metrics(workdir, 'final_validation'))


def final_metrics(workdir, split='validation'):
  """The final held-out metrics row a run wrote to metrics.jsonl, or None."""
  rows = metrics.read_metrics(workdir, f'final_{split}')
  return rows[-1] if rows else None


def curve(workdir, metric='accuracy', split='validation'):
  """(steps, values) of `metric` over a run: its periodic evals, then the final one."""
  rows = metrics.read_metrics(workdir, split) + metrics.read_metrics(workdir, f'final_{split}')
  return [r['step'] for r in rows], [r[metric] for r in rows]
