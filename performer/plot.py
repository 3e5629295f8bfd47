r"""Figures: a run's training curves, and the figures notebooks save for the docs.

    python -m performer.plot WORKDIR                 # writes WORKDIR/curves.png
    python -m performer.plot WORKDIR --out run.png   # anywhere else

`curves` reads `WORKDIR/metrics.jsonl` (what every run writes; performer/training/
metrics.py) and draws train and validation loss, accuracy (an encoder's cosine),
validation perplexity and the learning rate against the step. A run with an attention
transfer stage (`train.transfer_steps` in its config.json) has the two stages shaded:
during transfer the train loss and accuracy are the attention-transfer objective's (the
attention-output loss and cosine: convert/attention_transfer.py), not next-token ones.
The final evaluation (`final_validation`) is drawn as the validation curve's last point.

Notebooks call `show(fig, name)` instead of `plt.show()`: with PERFORMER_FIGURES_DIR set,
it also saves the figure there as NAME.png (how docs/figures/ is made).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

FIGURES_ENV = 'PERFORMER_FIGURES_DIR'  # notebooks save their figures here when set
DPI = 90  # small PNGs: the docs commit them


def read_rows(workdir):
  """metrics.jsonl as a list of dicts (without importing jax, so the CLI starts fast)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no metrics.jsonl (is {workdir} a training run?)')
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(rows, split, key):
  points = [(r['step'], r[key]) for r in rows if r['split'] == split and key in r]
  return [s for s, _ in points], [v for _, v in points]


def _transfer_steps(workdir):
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as f:
    return int(json.load(f).get('train', {}).get('transfer_steps', 0) or 0)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  if 'matplotlib.pyplot' not in sys.modules:
    matplotlib.use('Agg')  # no display needed; a notebook has chosen its backend already
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def curves(workdir, path=None, title=None):
  """Draws the run's curves into `path` (default WORKDIR/curves.png); returns the path."""
  rows = read_rows(workdir)
  if not rows:
    raise ValueError(f'{workdir}/metrics.jsonl is empty: nothing to plot yet')
  plt = _pyplot()
  path = path or os.path.join(workdir, 'curves.png')
  transfer = _transfer_steps(workdir)
  last = max(r['step'] for r in rows)
  score = 'cosine' if any('cosine' in r for r in rows) else 'accuracy'
  # the transfer stage's attention-output cosine shares the score panel (shaded there)
  rows = [{score: r['output_cosine'], **r} if 'output_cosine' in r else r for r in rows]
  panels = [
    ('loss', 'loss'),
    (score, score),
    ('perplexity', 'validation perplexity'),
    ('learning_rate', 'learning rate'),
  ]
  fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
  for ax, (key, label) in zip(axes.flat, panels):
    for split, style in (
      ('train', dict(color='tab:blue', alpha=0.8)),
      ('validation', dict(color='tab:red', marker='o')),
    ):
      steps, values = _series(rows, split, key)
      final_steps, final_values = _series(rows, f'final_{split}', key)
      if split == 'validation':
        steps, values = steps + final_steps, values + final_values
      if steps and not (key == 'perplexity' and split == 'train'):
        ax.plot(steps, values, label=split, **style)
    if transfer:
      ax.axvspan(0, transfer, color='tab:orange', alpha=0.08, label='attention transfer')
      ax.axvline(transfer, color='grey', linestyle='--', linewidth=0.8)
    if key == 'perplexity':
      _, values = _series(rows, 'validation', key)
      _, final = _series(rows, 'final_validation', key)
      if values + final and max(values + final) > 10 * min(values + final):
        ax.set_yscale('log')
    ax.set_xlim(0, max(last, 1))
    ax.set_xlabel('step')
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  if transfer:  # the transfer stage logs its own objective under these names
    axes[0, 0].set_ylabel('loss (shaded: attention-output loss)', fontsize=9)
    axes[0, 1].set_ylabel(f'{score} (shaded: attention-output cosine)', fontsize=9)
  fig.suptitle(title or os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  save(fig, path)
  plt.close(fig)
  return path


def save(fig, path, dpi=DPI):
  """Writes `fig` as a small PNG (256 colours), making its folder."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fig.savefig(path, dpi=dpi, bbox_inches='tight')
  shrink(path)


def shrink(path):
  """Rewrites the PNG at `path` with a 256-colour palette: plots have few colours, and the
  file is about a third of the size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as image:
    small = image.convert('RGB').quantize(colors=256, method=Image.Quantize.FASTOCTREE)
  small.save(path, optimize=True)


def show(fig, name):
  """A notebook's plt.show() that also saves `fig` as $PERFORMER_FIGURES_DIR/NAME.png."""
  folder = os.environ.get(FIGURES_ENV)
  if folder:
    save(fig, os.path.join(folder, name + '.png'))
  _pyplot().show()


def main(argv=None):
  p = argparse.ArgumentParser(description='Training curves of a run (metrics.jsonl) as a PNG.')
  p.add_argument('workdir')
  p.add_argument('--out', default=None, help='default: WORKDIR/curves.png')
  p.add_argument('--title', default=None, help="default: the workdir's name")
  args = p.parse_args(argv)
  try:
    path = curves(args.workdir, args.out, args.title)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
