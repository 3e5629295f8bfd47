"""The long-context table (one row per model and length) and the passkey heatmap."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from performer.training import long_context


def _fmt(value, spec):
  return '-' if value is None else format(value, spec)


def format_table(result) -> list[str]:
  """Plain-text rows: accuracy per task, perplexity per position bucket, prefill cost."""
  rows = result['rows']
  tasks = result['settings']['tasks']
  longest = max(r['length'] for r in rows)
  buckets = list(long_context.bucket_perplexity(np.zeros((1, longest)), longest))
  width = max(24, *(len(r['model']) + 2 for r in rows))
  head = f'{"model":{width}s}{"length":>7s}' + ''.join(f'{t:>9s}' for t in tasks)
  head += ''.join(f'{"ppl " + b:>15s}' for b in buckets)
  head += f'{"state MiB":>11s}{"XLA MiB":>9s}{"RSS MiB":>9s}{"tok/s":>8s}'
  trials = result['settings']['trials']
  lines = [
    f'== long context: {trials} trial(s) per task and length, seed '
    f'{result["settings"]["seed"]}; perplexity over {result["ppl_tokens"]} held-out tokens; '
    f'trained max_len {result["max_len"]} ==',
    head,
  ]
  for r in rows:
    line = f'{r["model"]:{width}s}{r["length"]:7d}'
    line += ''.join(f'{r[t]:9.0%}' for t in tasks)
    line += ''.join(f'{_fmt(r["perplexity"].get(b), ".2f"):>15s}' for b in buckets)
    line += f'{r["state_mib"]:11.3f}{_fmt(r["prefill_xla_mib"], ".0f"):>9s}'
    line += f'{r["rss_mib"]:9.0f}{_fmt(r["tokens_per_s"], ".0f"):>8s}'
    lines.append(line)
  return lines


def write_json(path, result):
  """Atomically: a temp file in the same folder, then os.replace."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.long_context-', dir=folder)
  with os.fdopen(fd, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


def passkey_grid(result, model):
  """(depths, lengths, accuracy [depth, length]) of one model's passkey trials."""
  rows = [r for r in result['rows'] if r['model'] == model and 'passkey_hits' in r]
  lengths = [r['length'] for r in rows]
  depths = sorted({round(d, 3) for r in rows for d, _ in r['passkey_hits']})
  grid = np.full((len(depths), len(lengths)), np.nan)
  for j, r in enumerate(rows):
    for i, depth in enumerate(depths):
      hits = [hit for d, hit in r['passkey_hits'] if round(d, 3) == depth]
      if hits:
        grid[i, j] = np.mean(hits)
  return depths, lengths, grid


def plot_heatmap(result, path):
  """Depth x length passkey accuracy, one panel per model, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  models = list(dict.fromkeys(r['model'] for r in result['rows']))
  fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
  for ax, model in zip(axes[0], models):
    depths, lengths, grid = passkey_grid(result, model)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap='RdYlGn', aspect='auto', origin='upper')
    ax.set_xticks(range(len(lengths)), [f'{n // 1024}k' if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f'{d:.0%}' for d in depths])
    ax.set_xlabel('prompt length (tokens)')
    ax.set_ylabel('needle depth')
    ax.set_title(model, fontsize=9)
  fig.colorbar(image, ax=axes[0].tolist(), label='passkey accuracy')
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
