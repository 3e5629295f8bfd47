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
# # 3. The protein Performer
#
# The default job (`configs/default.py` = `protein_performer_softmax_uni`): a
# causal protein language model with FAVOR+ softmax attention, trained on the
# bundled 2,100-protein sample. This notebook
#
# 1. trains it briefly (or loads a finished run: set `PERFORMER_PROTEIN_WORKDIR`
#    to the workdir of `python train.py --config=configs/default.py`, and
#    `PERFORMER_PROTEIN_SOFTMAX_WORKDIR` to one of
#    `configs/protein_transformer_uni.py` for the comparison),
# 2. compares its accuracy with a same-size softmax Transformer trained the
#    same way on the same data,
# 3. draws attention maps of several layers and heads for one protein, and
# 4. estimates an amino-acid similarity matrix from attention, as the Performer
#    paper does (Sec. 4.2), and compares it with BLOSUM62.
#
# FAVOR+ never forms the attention matrix. `performer.models.attention_maps` captures
# the q and k each layer's attention is called with and rebuilds the matrix
# phi(q) phi(k)^T (row-normalised) with the layer's own random features.
#
# Runs are cached (`performer.training.runs`) in `PERFORMER_NOTEBOOK_WORKDIR`
# (default: a temporary folder), which notebooks 4 and 5 reuse.
# `PERFORMER_NOTEBOOK_QUICK=1` trains a tiny model for 30 steps (a smoke test,
# not a result).

# %%
import os
import sys

try:
  import performer  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: notebooks/ is beside performer/
  sys.path.insert(0, os.path.abspath('..'))

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from scipy import stats

from performer import data, plot
from performer.data import vocab as vocab_lib
from performer.models import attention_maps
from performer.training import restore, runs

# The same settings (from the environment) in notebooks 3, 4 and 5, so their runs are shared.
RUNS = runs.NotebookRuns.from_env()
print(f'workdir {RUNS.work}; quick={RUNS.quick}')

# %% [markdown]
# ## Train (or load) the Performer and the softmax Transformer

# %%
performer_dir = os.environ.get('PERFORMER_PROTEIN_WORKDIR') or RUNS.train(
  'protein_favor', 'default.py'
)
softmax_dir = os.environ.get('PERFORMER_PROTEIN_SOFTMAX_WORKDIR') or (
  None
  if os.environ.get('PERFORMER_PROTEIN_WORKDIR')
  else RUNS.train('protein_softmax', 'protein_transformer_uni.py')
)
restored = restore.restore(performer_dir)
model, config, step = restored.model(), restored.config, restored.step
vocab = data.vocab_for(config.data)
print(
  f'Performer: {config.model.num_layers} layers, d={config.model.emb_dim}, '
  f'{config.model.attention.kind}, step {step}'
)

# %% [markdown]
# ## Accuracy against a same-size softmax Transformer
# Held-out (validation split) next-residue accuracy and perplexity after the
# same number of steps, beside the unigram (residue frequency) baseline.

# %%
unigram = data.unigram_baseline(config.data, split='validation')
print(f'{"model":28s}{"steps":>7s}{"loss":>9s}{"accuracy":>10s}{"perplexity":>12s}')
results = {}
for label, workdir in (
  ('Performer (favor_softmax)', performer_dir),
  ('Transformer (softmax)', softmax_dir),
):
  result = runs.final_metrics(workdir) if workdir else None
  if result is None:
    print(f'{label:28s}  (no run: set PERFORMER_PROTEIN_SOFTMAX_WORKDIR)')
    continue
  results[label] = result
  print(
    f'{label:28s}{result["step"]:7d}{result["loss"]:9.4f}{result["accuracy"]:10.4f}'
    f'{result["perplexity"]:12.3f}'
  )
print(
  f'{"unigram baseline":28s}{"":7s}{unigram["cross_entropy"]:9.4f}{"":10s}'
  f'{unigram["perplexity"]:12.3f}'
)

# %% [markdown]
# ## Attention maps for one protein
# The first validation protein that fills the whole window. Each panel is one
# head's attention matrix over the first `SHOW` positions (query position
# down, key position across; causal, so upper triangles are empty), on a
# square-root colour scale so that small weights stay visible.

# %%
batch = next(
  data.build_dataset(config.data, split='validation', batch_size=32, seed=0, num_epochs=1)
)
row = int(np.argmax(batch['mask'].sum(axis=1)))
tokens, mask = batch['tokens'][row : row + 1], batch['mask'][row : row + 1]
_, maps = attention_maps.attention_maps(model, jnp.asarray(tokens), mask=jnp.asarray(mask))
maps = np.asarray(maps[:, 0])  # [layers, heads, L, L]
num_layers, num_heads = maps.shape[:2]
SHOW = min(maps.shape[-1], 96)
print('protein:', vocab.decode(tokens[0])[:80], '...')
fig, axes = plt.subplots(
  num_layers, num_heads, figsize=(2.6 * num_heads, 2.6 * num_layers), squeeze=False
)
for layer in range(num_layers):
  for head in range(num_heads):
    ax = axes[layer, head]
    ax.imshow(maps[layer, head, :SHOW, :SHOW] ** 0.5, cmap='viridis')
    ax.set_title(f'layer {layer} head {head}', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plot.show(fig, 'protein_attention_maps')  # saved too when PERFORMER_FIGURES_DIR is set

# %% [markdown]
# ## Amino-acid similarity from attention
# Following the paper: over many proteins, add up the attention weight that
# queries of residue type a put on keys of type b (every layer and head, the
# query's own position excluded). Dividing by what uniform attention over the
# same (causal) context would give, E[a, b], removes residue frequencies: the
# similarity is log(S[a, b] / E[a, b]), symmetrised. BLOSUM62 below is the
# standard substitution matrix (Henikoff & Henikoff, 1992; public domain).

# %%
BLOSUM_ORDER = 'ARNDCQEGHILKMFPSTWYV'
BLOSUM62_ROWS = """
 4 -1 -2 -2  0 -1 -1  0 -2 -1 -1 -1 -1 -2 -1  1  0 -3 -2  0
-1  5  0 -2 -3  1  0 -2  0 -3 -2  2 -1 -3 -2 -1 -1 -3 -2 -3
-2  0  6  1 -3  0  0  0  1 -3 -3  0 -2 -3 -2  1  0 -4 -2 -3
-2 -2  1  6 -3  0  2 -1 -1 -3 -4 -1 -3 -3 -1  0 -1 -4 -3 -3
 0 -3 -3 -3  9 -3 -4 -3 -3 -1 -1 -3 -1 -2 -3 -1 -1 -2 -2 -1
-1  1  0  0 -3  5  2 -2  0 -3 -2  1  0 -3 -1  0 -1 -2 -1 -2
-1  0  0  2 -4  2  5 -2  0 -3 -3  1 -2 -3 -1  0 -1 -3 -2 -2
 0 -2  0 -1 -3 -2 -2  6 -2 -4 -4 -2 -3 -3 -2  0 -2 -2 -3 -3
-2  0  1 -1 -3  0  0 -2  8 -3 -3 -1 -2 -1 -2 -1 -2 -2  2 -3
-1 -3 -3 -3 -1 -3 -3 -4 -3  4  2 -3  1  0 -3 -2 -1 -3 -1  3
-1 -2 -3 -4 -1 -2 -3 -4 -3  2  4 -2  2  0 -3 -2 -1 -2 -1  1
-1  2  0 -1 -3  1  1 -2 -1 -3 -2  5 -1 -3 -1  0 -1 -3 -2 -2
-1 -1 -2 -3 -1  0 -2 -3 -2  1  2 -1  5  0 -2 -1 -1 -1 -1  1
-2 -3 -3 -3 -2 -3 -3 -3 -1  0  0 -3  0  6 -4 -2 -2  1  3 -1
-1 -2 -2 -1 -3 -1 -1 -2 -2 -3 -3 -1 -2 -4  7 -1 -1 -4 -3 -2
 1 -1  1  0 -1  0  0  0 -1 -2 -2  0 -1 -2 -1  4  1 -3 -2 -2
 0 -1  0 -1 -1 -1 -1 -2 -2 -1 -1 -1 -1 -2 -1  1  5 -2 -2  0
-3 -3 -4 -4 -2 -2 -3 -2 -2 -3 -2 -3 -1  1 -4 -3 -2 11  2 -3
-2 -2 -2 -3 -2 -1 -2 -3  2 -1 -1 -2 -1  3 -3 -2 -2  2  7 -1
 0 -3 -3 -3 -1 -2 -2 -3 -3  3  1 -2  1 -1 -2 -2  0 -3 -1  4
"""
AMINO = vocab_lib.STANDARD  # the vocabulary's order: ACDEFGHIKLMNPQRSTVWY
blosum_raw = np.array(BLOSUM62_ROWS.split(), float).reshape(20, 20)
assert (blosum_raw == blosum_raw.T).all()
perm = [BLOSUM_ORDER.index(a) for a in AMINO]
BLOSUM62 = blosum_raw[np.ix_(perm, perm)]
FIRST = vocab.num_special  # id of 'A'; the 20 standard residues follow


def pair_mass(model, tokens, mask):
  """(S, E) [20, 20] for one batch: attention mass from type a onto type b,
  and the mass uniform attention over the same allowed keys would give."""
  _, maps = attention_maps.attention_maps(model, tokens, mask=mask)
  attn = jnp.mean(maps, axis=(0, 2))  # [B, L, L] over layers, heads
  length = tokens.shape[1]
  allowed = (
    (
      jnp.tril(jnp.ones((length, length), bool))
      if model.causal
      else jnp.ones((length, length), bool)
    )[None]
    & mask[:, None, :]
    & mask[:, :, None]
  )
  allowed &= ~jnp.eye(length, dtype=bool)[None]
  attn = jnp.where(allowed, attn, 0.0)
  uniform = allowed / jnp.maximum(allowed.sum(-1, keepdims=True), 1)
  onehot = jax.nn.one_hot(tokens - FIRST, 20) * mask[..., None]  # specials -> zero rows
  s = jnp.einsum('bij,bia,bjc->ac', attn, onehot, onehot)
  e = jnp.einsum('bij,bia,bjc->ac', uniform, onehot, onehot)
  return s, e


def similarity(model, config, num_proteins):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, t, m: pair_mass(nnx.merge(graphdef, state), t, m))
  batch_size = 8 if RUNS.quick else 16
  it = data.build_dataset(config.data, split='train', batch_size=batch_size, seed=1, num_epochs=1)
  s = e = 0.0
  for _, batch in zip(range(max(1, num_proteins // batch_size)), it):
    ds, de = fn(state, jnp.asarray(batch['tokens']), jnp.asarray(batch['mask']))
    s, e = s + np.asarray(ds), e + np.asarray(de)
  sym = np.log((s + s.T + 1e-9) / (e + e.T + 1e-9))
  return sym


def pair_rank(matrix, a, b):
  """1 + the number of off-diagonal pairs more similar than (a, b)."""
  iu = np.triu_indices(20, k=1)
  return 1 + int(np.sum(matrix[iu] > matrix[AMINO.index(a), AMINO.index(b)]))


def compare(sim, label):
  """Correlation with BLOSUM62 over the 190 off-diagonal pairs, and where the
  D-E and F-Y pairs rank among them (1 = most similar)."""
  iu = np.triu_indices(20, k=1)
  pearson = stats.pearsonr(sim[iu], BLOSUM62[iu])[0]
  spearman = stats.spearmanr(sim[iu], BLOSUM62[iu])[0]
  de, fy = pair_rank(sim, 'D', 'E'), pair_rank(sim, 'F', 'Y')
  print(
    f'{label}: Pearson r = {pearson:.3f}, Spearman rho = {spearman:.3f} with BLOSUM62 '
    f'over 190 pairs; D-E ranks {de}/190, F-Y {fy}/190'
  )
  return {'pearson': pearson, 'spearman': spearman, 'rank_DE': de, 'rank_FY': fy}


print(
  f'in BLOSUM62 itself D-E ranks {pair_rank(BLOSUM62, "D", "E")}/190 and F-Y '
  f'{pair_rank(BLOSUM62, "F", "Y")}/190'
)


NUM_PROTEINS = 64 if RUNS.quick else 1024
sims = {'Performer': similarity(model, config, NUM_PROTEINS)}
if softmax_dir:
  restored = restore.restore(softmax_dir)
  softmax_model, softmax_config = restored.model(), restored.config
  sims['Transformer'] = similarity(softmax_model, softmax_config, NUM_PROTEINS)
similarity_report = {label: compare(sim, label) for label, sim in sims.items()}

# %%
fig, axes = plt.subplots(1, len(sims) + 1, figsize=(5.2 * (len(sims) + 1), 4.6))
for ax, (label, matrix) in zip(axes, [*sims.items(), ('BLOSUM62', BLOSUM62)]):
  shown = matrix.copy()
  np.fill_diagonal(shown, np.nan)  # the diagonal dwarfs the rest in BLOSUM62
  im = ax.imshow(
    shown, cmap='RdBu_r', vmin=-np.nanmax(np.abs(shown)), vmax=np.nanmax(np.abs(shown))
  )
  ax.set_xticks(range(20), list(AMINO), fontsize=7)
  ax.set_yticks(range(20), list(AMINO), fontsize=7)
  ax.set_title(label if label == 'BLOSUM62' else f'{label}: log attention enrichment')
  plt.colorbar(im, ax=ax, fraction=0.046)
plt.tight_layout()
plot.show(fig, 'amino_acid_similarity')  # saved too when PERFORMER_FIGURES_DIR is set

# %% [markdown]
# ## Key numbers
# A model trained for minutes on 2,000 proteins is far from the paper's
# (TrEMBL, 36 layers, days of TPU time), so the similarity structure is weak
# at best; the numbers above say how much of it is there.

# %%
for label, result in results.items():
  print(
    f'{label}: validation accuracy {result["accuracy"]:.4f}, '
    f'perplexity {result["perplexity"]:.3f} (unigram {unigram["perplexity"]:.3f})'
  )
for label, report in similarity_report.items():
  print(
    f'{label} similarity vs BLOSUM62: Pearson {report["pearson"]:.3f}, Spearman '
    f'{report["spearman"]:.3f}; D-E rank {report["rank_DE"]}/190, '
    f'F-Y rank {report["rank_FY"]}/190'
  )
