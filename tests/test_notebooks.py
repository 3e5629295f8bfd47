"""The notebooks: paired with their jupytext .py, stored without outputs, and runnable.

Each notebook is executed top to bottom with nbclient in a fresh kernel, in a temporary
working directory, failing on the first cell error. The default suite checks only that
they are paired and stripped; `pytest -m slow` runs them in quick mode
(PERFORMER_NOTEBOOK_QUICK=1: tiny models, few steps) and at full settings. Notebooks 3-5
share trained runs through PERFORMER_NOTEBOOK_WORKDIR, so one test runs them all, in
order, with one shared folder; notebook 6 (linearizing a pretrained
LLM) shares nothing and has a quick test of its own that checks what it computed.

Edit the .py files and regenerate the pairs with `jupytext --sync notebooks/*.py`
(--sync keeps the cell ids of the existing .ipynb).
"""

import glob
import json
import math
import os
import re

import pytest

from conftest import ROOT

nbformat = pytest.importorskip('nbformat')
jupytext = pytest.importorskip('jupytext')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')  # the 'python3' kernel the notebooks run in

NOTEBOOK_DIR = os.path.join(ROOT, 'notebooks')
SOURCES = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, '[0-9][0-9]_*.py')))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in SOURCES]
LINEARIZE = '06_linearizing_llm'  # no shared runs: a quick test of its own
SHARED = [n for n in NAMES if n != LINEARIZE]
# What each notebook saves through performer.plot.show when PERFORMER_FIGURES_DIR is set
# (how docs/figures/ is made): NAME.png in that folder.
FIGURES = {
  '01_approximation_error': ['approximation_error'],
  '02_speed_memory': ['speed_memory'],
  '03_protein_performer': ['protein_attention_maps', 'amino_acid_similarity'],
  '04_transformer_to_performer': ['transformer_to_performer'],
  '05_sampling': ['sampling_composition'],
  LINEARIZE: ['linearization_curve', 'linearization_attention_map'],
}


def _cells(nb):
  return [(c.cell_type, c.source) for c in nb.cells]


def test_every_notebook_is_paired():
  assert len(NAMES) == 6 and LINEARIZE in NAMES and sorted(FIGURES) == NAMES, NAMES
  ipynbs = sorted(
    p for p in glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')) if not p.endswith('.out.ipynb')
  )  # executed copies, if any
  assert [os.path.splitext(os.path.basename(p))[0] for p in ipynbs] == NAMES


@pytest.mark.parametrize('name', NAMES)
def test_every_figure_is_saved_by_name(name):
  """Each figure goes through performer.plot.show under its name (the slow tests check the
  PNGs); a bare plt.show() would leave it out of docs/figures/."""
  with open(os.path.join(NOTEBOOK_DIR, name + '.py'), encoding='utf-8') as f:
    source = f.read()
  assert 'plt.show()' not in source
  assert re.findall(r"plot\.show\(fig, '(\w+)'\)", source) == FIGURES[name]


@pytest.mark.parametrize('name', NAMES)
def test_ipynb_is_stripped_and_in_sync(name):
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name + '.ipynb'), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, (
        f'{name}.ipynb has outputs: strip them (jupytext --sync notebooks/*.py)'
      )
  assert nb.metadata['jupytext']['formats'] == 'ipynb,py:percent'
  paired = jupytext.read(os.path.join(NOTEBOOK_DIR, name + '.py'))
  assert _cells(nb) == _cells(paired), (
    f'{name}.ipynb and {name}.py differ: run `jupytext --sync notebooks/{name}.py`'
  )


def execute(name, workdir, run_dir, monkeypatch, quick):
  """Runs notebooks/<name>.ipynb in a new kernel; returns the executed notebook."""
  monkeypatch.setenv('PYTHONPATH', ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  monkeypatch.setenv('PERFORMER_NOTEBOOK_WORKDIR', str(workdir))
  monkeypatch.setenv('PERFORMER_NOTEBOOK_QUICK', '1' if quick else '0')
  monkeypatch.setenv('PERFORMER_FIGURES_DIR', str(run_dir / 'figures'))
  for var in (
    'PERFORMER_PROTEIN_WORKDIR',
    'PERFORMER_PROTEIN_SOFTMAX_WORKDIR',
    'PERFORMER_MODEL_BENCH_JSON',
    'PERFORMER_LINEARIZE_WORKDIR',
  ):
    monkeypatch.delenv(var, raising=False)
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name + '.ipynb'), as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=600 if quick else 3600,
    kernel_name='python3',
    resources={'metadata': {'path': str(run_dir)}},
  )
  client.execute()  # raises CellExecutionError naming the failing cell
  return nb


def check_executed(name, nb, run_dir):
  """No error output, at least one plot, every figure saved as a PNG, no NaN printed;
  returns the printed text."""
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  assert [o for o in outputs if 'image/png' in o.get('data', {})], f'{name} drew no plot'
  for figure in FIGURES[name]:
    path = run_dir / 'figures' / f'{figure}.png'
    assert path.read_bytes()[:4] == b'\x89PNG', f'{name} did not save {path.name}'
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'nan' not in text.lower().split(), f'{name} printed NaN'
  return text


def run_all(tmp_path, monkeypatch, quick, names=SHARED):
  """The notebooks in order, in one test: notebooks 4 and 5 reuse notebook 3's runs
  through the shared workdir, which separate tests could not rely on under xdist."""
  workdir = tmp_path / 'runs'
  workdir.mkdir()
  texts = {}
  for name in names:
    run_dir = tmp_path / name
    run_dir.mkdir()
    nb = execute(name, workdir, run_dir, monkeypatch, quick)
    texts[name] = check_executed(name, nb, run_dir)
  return workdir, texts


@pytest.mark.slow
def test_notebooks_run_quick(tmp_path, monkeypatch):
  workdir, texts = run_all(tmp_path, monkeypatch, quick=True)
  assert 'Pearson' in texts['03_protein_performer'] and 'D-E' in texts['03_protein_performer']
  assert 'zero-shot' in texts['04_transformer_to_performer']
  assert (workdir / 'samples_quick.faa').read_text().startswith('>sample_0')


@pytest.mark.slow
def test_notebook_06_linearizing_quick(tmp_path, monkeypatch):
  """A tiny random Llama GGUF converted in two stages: the curve has one point per eval
  (after step 0) at finite perplexities, the transfer changed the attention maps only
  past the window, and recurrent decoding equals the parallel forward pass."""
  from performer.training import metrics

  workdir, run_dir = tmp_path / 'runs', tmp_path / LINEARIZE
  workdir.mkdir()
  run_dir.mkdir()
  nb = execute(LINEARIZE, workdir, run_dir, monkeypatch, quick=True)
  text = check_executed(LINEARIZE, nb, run_dir)
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert len([o for o in outputs if 'image/png' in o.get('data', {})]) == 2  # curve, maps
  s = json.loads((workdir / 'linearize_quick.json').read_text())
  assert (s['transfer_steps'], s['num_steps']) == (4, 6)
  evals = metrics.read_metrics(s['workdir'], 'validation')
  final = metrics.read_metrics(s['workdir'], 'final_validation')
  assert s['steps'] == [0] + [r['step'] for r in evals + final] == [0, 2, 4, 6]
  assert s['perplexity'][1:] == [r['perplexity'] for r in evals + final]
  assert all(math.isfinite(p) and p > 1 for p in s['perplexity'] + [s['softmax_perplexity']])
  assert s['map_after_step'] == 4 and s['map_max_change'] > 1e-3
  assert s['in_window_max_diff'] < 1e-5  # queries inside the window: exact softmax
  assert 0 < s['tokens_past_window'] < 1
  assert s['rnn_matches_parallel'] and s['completion']
  assert 'recurrent decoding == parallel forward argmax: True' in text


@pytest.mark.slow
def test_notebooks_run_full(tmp_path, monkeypatch):
  run_all(tmp_path, monkeypatch, quick=False, names=NAMES)
