"""performer.plot: a run's curves as a PNG from its metrics.jsonl, and notebook figures saved
where PERFORMER_FIGURES_DIR says."""

import json

from conftest import run_script
from performer import plot


def fake_run(folder, transfer_steps=0):
  """A tiny metrics.jsonl as the training loop writes it (train rows, periodic and final
  evals), and a config.json with the one key the plot reads."""
  rows = [
    {'step': s, 'split': 'train', 'loss': 3.0 - s / 20, 'accuracy': s / 100, 'learning_rate': 1e-3}
    for s in range(5, 45, 5)
  ]
  rows += [
    {'step': s, 'split': 'validation', 'loss': 2.9 - s / 30, 'accuracy': s / 90, 'perplexity': 18.0}
    for s in (20, 40)
  ]
  rows.append({'step': 40, 'split': 'final_validation', 'loss': 1.6, 'perplexity': 5.0})
  folder.mkdir(exist_ok=True)
  (folder / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (folder / 'config.json').write_text(json.dumps({'train': {'transfer_steps': transfer_steps}}))
  return folder


def is_png(path):
  return path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_cli_writes_curves_png_into_the_workdir(tmp_path):
  run = fake_run(tmp_path / 'run')
  proc = run_script(['-m', 'performer.plot', str(run)], timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert is_png(run / 'curves.png') and f'wrote {run}/curves.png' in proc.stdout


def test_curves_with_a_transfer_stage_and_an_output_path(tmp_path):
  run = fake_run(tmp_path / 'run', transfer_steps=20)
  out = tmp_path / 'figures' / 'linearize.png'
  assert plot.curves(str(run), str(out), title='two stages') == str(out)
  assert is_png(out) and not (run / 'curves.png').exists()


def test_missing_or_empty_metrics_is_one_line_exit_2(tmp_path):
  assert plot.main([str(tmp_path)]) == 2
  (tmp_path / 'metrics.jsonl').write_text('')
  proc = run_script(['-m', 'performer.plot', str(tmp_path)], timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0, proc.stderr
  assert 'empty' in proc.stderr


def test_show_saves_the_figure_where_the_environment_says(tmp_path, monkeypatch):
  plt = plot._pyplot()  # pylint: disable=protected-access
  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  monkeypatch.delenv(plot.FIGURES_ENV, raising=False)
  plot.show(fig, 'nowhere')  # unset: only shows
  monkeypatch.setenv(plot.FIGURES_ENV, str(tmp_path / 'figs'))
  plot.show(fig, 'line')
  plt.close(fig)
  assert is_png(tmp_path / 'figs' / 'line.png') and not list(tmp_path.glob('nowhere*'))
