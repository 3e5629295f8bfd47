# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Speed and memory against sequence length
#
# Full-model training-step time (forward, backward and the AdamW update) and
# XLA's peak memory against L, for exact softmax attention, the Performer
# kinds (`favor_softmax`, `favor_relu`) and the identity ("dummy") attention
# that returns v -- the lower bound any attention can reach. Log-log axes, as
# in the paper's speed plot: a line of slope 1 is linear in L, slope 2
# quadratic.
#
# The measurement code is `benchmarks/model.py` (the same function the
# benchmark script runs), so the numbers here and in the docs' benchmark table mean the
# same thing. This notebook runs a smaller model than the benchmark's default
# (6 layers, d=512) so that it finishes in a few minutes on 2 CPU cores; set
# `PERFORMER_MODEL_BENCH_JSON` to the `--json` output of a full
# `python benchmarks/model.py --json model.json` run to plot that instead.
# `PERFORMER_NOTEBOOK_QUICK=1` shrinks everything to a smoke test.
#
# A case predicted to take longer than `--max_seconds` per step is not timed;
# its peak memory is still reported, because XLA gives it from compiling alone.

# %%
import json
import os
import sys

try:
  import performer
except ImportError:  # a checkout without `pip install -e .`: notebooks/ is beside performer/
  sys.path.insert(0, os.path.abspath('..'))
  import performer
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(performer.__file__)))
if ROOT not in sys.path:  # benchmarks/ is a top-level folder of the repository
  sys.path.insert(0, ROOT)

import matplotlib.pyplot as plt

from benchmarks import model as model_bench
from performer import plot

QUICK = os.environ.get('PERFORMER_NOTEBOOK_QUICK', '0') == '1'
JSON = os.environ.get('PERFORMER_MODEL_BENCH_JSON', '')
if QUICK:
  ARGV = [
    '--quick',
    '--lengths',
    '128',
    '512',
    '--modes',
    'causal',
    '--kinds',
    'favor_softmax',
    'identity',
  ]
else:
  ARGV = [
    '--layers',
    '4',
    '--emb_dim',
    '256',
    '--heads',
    '4',
    '--mlp_dim',
    '1024',
    '--num_features',
    '128',
    '--lengths',
    '512',
    '1024',
    '2048',
    '4096',
    '8192',
    '--max_seconds',
    '8',
    '--max_memory_gb',
    '4',
  ]
args = model_bench.parse_args(ARGV)
print(' '.join(ARGV) if not JSON else f'reading {JSON}')

# %%
if JSON:
  with open(JSON, encoding='utf-8') as f:
    saved = json.load(f)
  rows = saved['rows']
  print(f'model: {saved["args"]["layers"]} layers, d={saved["args"]["emb_dim"]}')
else:
  print(
    f'model: {args.layers} layers, d={args.emb_dim}, {args.heads} heads, mlp {args.mlp_dim}, '
    f'm={args.num_features}, batch {args.batch}, {args.dtype}'
  )
  rows = model_bench.run(args, log=print)
print(model_bench.common.format_table(rows, model_bench.COLUMNS))

# %%
modes = [m for m in model_bench.MODES if any(r['mode'] == m for r in rows)]
kinds = [k for k in model_bench.KINDS if any(r['kind'] == k for r in rows)]
colors = {
  'softmax': 'tab:red',
  'favor_softmax': 'tab:blue',
  'favor_relu': 'tab:green',
  'identity': 'black',
}
fig, axes = plt.subplots(len(modes), 2, figsize=(11, 4 * len(modes)), squeeze=False)
for i, mode in enumerate(modes):
  for j, (key, label) in enumerate((('ms', 'training step (ms)'), ('peak_mb', 'peak memory (MB)'))):
    ax = axes[i, j]
    for kind in kinds:
      pts = sorted(
        (r['length'], r[key])
        for r in rows
        if r['mode'] == mode and r['kind'] == kind and r.get(key)
      )
      if pts:
        ax.plot(
          *zip(*pts),
          marker='o',
          color=colors.get(kind),
          label=kind,
          linestyle=':' if kind == 'identity' else '-',
        )
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('sequence length L')
    ax.set_ylabel(label)
    ax.set_title(f'{mode}: {label}')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
plt.tight_layout()
plot.show(fig, 'speed_memory')  # saved too when PERFORMER_FIGURES_DIR is set

# %% [markdown]
# ## Key numbers
# Step time relative to identity at the longest length every linear kind was
# timed at, and memory growth from L to 4L (the targets of docs/design.md
# section 6, at L=8192 on the full-size model: Performer <= 1.3x identity;
# memory growth <= 4.4x, against about 16x for softmax).

# %%
for mode in modes:
  timed = [r for r in rows if r['mode'] == mode and r.get('x_identity')]
  for kind in kinds:
    mine = [r for r in timed if r['kind'] == kind]
    if mine:
      last = max(mine, key=lambda r: r['length'])
      print(
        f'{mode:13s} {kind:14s} L={last["length"]:5d}: {last["x_identity"]:.2f}x identity'
        + (f', {last["vs_softmax"]:.1f}x faster than softmax' if last.get('vs_softmax') else '')
      )
for line in model_bench.summary_lines(rows, length=max(r['length'] for r in rows)):
  print(line)
