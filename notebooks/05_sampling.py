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
# # 5. Sampling proteins from a trained Performer
#
# `performer.sampling.generate` decodes a causal model one token at a time
# with the Performer's recurrent form: each layer keeps a fixed-size state
# (S, z) per head instead of a growing key/value cache, so the cost per token
# does not depend on how much has been generated.
#
# The model is notebook 3's protein Performer (trained here briefly if that
# notebook has not run in the same `PERFORMER_NOTEBOOK_WORKDIR`), or a finished
# run of `configs/default.py` given as `PERFORMER_PROTEIN_WORKDIR`. We sample
# proteins from BOS, write them as FASTA, compare their residue composition and
# lengths with the training data, and continue the start of a held-out protein.
# `PERFORMER_NOTEBOOK_QUICK=1` uses a tiny model (its samples are noise).

# %%
import collections
import os
import sys

try:
  import performer  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: notebooks/ is beside performer/
  sys.path.insert(0, os.path.abspath('..'))

import jax
import matplotlib.pyplot as plt
import numpy as np

from performer import data, plot, sampling
from performer.data import vocab as vocab_lib
from performer.training import restore, runs

# The same settings (from the environment) in notebooks 3, 4 and 5, so their runs are shared.
RUNS = runs.NotebookRuns.from_env()
NUM_SAMPLES = 8 if RUNS.quick else 32
TEMPERATURE, TOP_P = 1.0, 0.95

workdir = os.environ.get('PERFORMER_PROTEIN_WORKDIR') or RUNS.train('protein_favor', 'default.py')
restored = restore.restore(workdir)
model, config, step = restored.model(), restored.config, restored.step
vocab = data.vocab_for(config.data)
print(
  f'{workdir}: {config.model.attention.kind}, {config.model.num_layers} layers, '
  f'd={config.model.emb_dim}, max_len {model.max_len}, step {step}'
)

# %% [markdown]
# ## Unconditional samples
# Every prompt is just BOS; a row stops at EOS or at the model's max_len.
# Nucleus sampling (top-p 0.95) at temperature 1.

# %%
prompts, lengths = sampling.pad_prompts([[vocab.bos_id]] * NUM_SAMPLES)
tokens, out_lengths = sampling.generate(
  model,
  prompts,
  lengths,
  max_new_tokens=model.max_len - 1,
  key=jax.random.key(0),
  temperature=TEMPERATURE,
  top_p=TOP_P,
  eos_id=vocab.eos_id,
  pad_id=vocab.pad_id,
)
tokens, out_lengths = np.asarray(tokens), np.asarray(out_lengths)
samples = [vocab.decode(row[1:n]) for row, n in zip(tokens, out_lengths)]
ended = [vocab.eos_id in row[1:n] for row, n in zip(tokens, out_lengths)]
fasta_path = os.path.join(RUNS.work, f'samples_{RUNS.tag}.faa')
with open(fasta_path, 'w', encoding='ascii') as f:
  for i, (seq, eos) in enumerate(zip(samples, ended)):
    f.write(
      f'>sample_{i} temperature={TEMPERATURE} top_p={TOP_P} '
      f'{"complete" if eos else "truncated_at_max_len"}\n'
    )
    for start in range(0, len(seq), 60):
      f.write(seq[start : start + 60] + '\n')
print(f'wrote {len(samples)} samples to {fasta_path}')
print(open(fasta_path, encoding='ascii').read()[:1500])

# %% [markdown]
# ## Do they look like proteins?
# Residue composition of the samples against the training windows, and how
# often a sample starts with methionine (M), as most real proteins do.

# %%
train_batches = data.build_dataset(config.data, split='train', batch_size=32, seed=0, num_epochs=1)
real = collections.Counter()
real_first = collections.Counter()
for _, batch in zip(range(8), train_batches):
  for row, m in zip(batch['tokens'], batch['mask']):
    text = vocab.decode(row[m])
    real.update(text)
    real_first.update(text[:1])
made = collections.Counter(''.join(samples))
amino = vocab_lib.STANDARD
p_real = np.array([real[a] for a in amino], float)
p_made = np.array([made[a] for a in amino], float)
p_real /= p_real.sum()
p_made /= max(p_made.sum(), 1)
tv = 0.5 * np.abs(p_real - p_made).sum()
starts_m = np.mean([s[:1] == 'M' for s in samples])
real_m = real_first['M'] / max(sum(real_first.values()), 1)
print(f'total variation distance of residue composition (samples vs train): {tv:.3f}')
print(
  f'samples starting with M: {starts_m:.0%} (training windows: {real_m:.0%}, '
  'random crops, so an underestimate for whole proteins)'
)
print(
  f'samples that ended with EOS: {np.mean(ended):.0%}; mean length '
  f'{np.mean([len(s) for s in samples]):.0f} residues'
)

fig, ax = plt.subplots(figsize=(9, 3.2))
x = np.arange(len(amino))
ax.bar(x - 0.2, p_real, width=0.4, label='training data')
ax.bar(x + 0.2, p_made, width=0.4, label='samples')
ax.set_xticks(x, list(amino))
ax.set_ylabel('frequency')
ax.legend()
plot.show(fig, 'sampling_composition')  # saved too when PERFORMER_FIGURES_DIR is set

# %% [markdown]
# ## Continuing a held-out protein
# The first 20 residues of a validation protein as the prompt (after BOS), one
# greedy continuation and one sampled, beside the real continuation.

# %%
val = next(data.build_dataset(config.data, split='validation', batch_size=4, seed=0, num_epochs=1))
row = int(np.argmax(val['mask'].sum(axis=1)))
real_tokens = val['tokens'][row][val['mask'][row]]
prompt = [int(t) for t in real_tokens[:21]]  # BOS + 20 residues
new = min(40, model.max_len - len(prompt))
for label, temperature in (('greedy', 0.0), ('sampled', TEMPERATURE)):
  out, n = sampling.generate(
    model,
    [prompt],
    max_new_tokens=new,
    key=jax.random.key(1),
    temperature=temperature,
    top_p=TOP_P,
    eos_id=vocab.eos_id,
  )
  cont = vocab.decode(np.asarray(out)[0, len(prompt) : int(n[0])])
  print(f'{label:8s} {vocab.decode(prompt)} | {cont}')
print(
  f'{"real":8s} {vocab.decode(prompt)} | {vocab.decode(real_tokens[len(prompt) : len(prompt) + new])}'
)
