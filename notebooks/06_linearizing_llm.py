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
# # 6. Linearizing a pretrained LLM
#
# `configs/linearize_smollm2.py` turns SmolLM2-135M-Instruct (a softmax Llama)
# into a model whose attention is linear beyond a window, with the LoLCATs
# recipe, in one `train.py` run of two stages:
#
# 1. **attention transfer** (`train.transfer_steps`): only the attention
#    modules' own parameters train (Hedgehog's feature maps, the window gains),
#    so that each layer reproduces the softmax original's attention output on
#    the original's own layer inputs;
# 2. **LoRA + distillation**: rank-8 adapters on q, k, v, o learn from the
#    frozen original's logits plus the next-token loss.
#
# Attention is exact softmax over the last `attention.window` keys and
# Hedgehog's linear attention beyond, so decoding keeps a fixed-size state.
# This notebook shows
#
# 1. validation perplexity against conversion steps, per stage, beside the
#    softmax original's,
# 2. one head's attention map before and after the transfer, beside the
#    original's, and
# 3. a greedy sample decoded as an RNN.
#
# Full mode runs the config (~21 min on 2 CPU cores) in
# `PERFORMER_NOTEBOOK_WORKDIR`, or reuses a finished run named by
# `PERFORMER_LINEARIZE_WORKDIR` (`python train.py
# --config=configs/linearize_smollm2.py --workdir=...`).
# `PERFORMER_NOTEBOOK_QUICK=1` does the same on a tiny random Llama GGUF
# written here and a toy corpus (a smoke test, not a result).

# %%
import functools
import json
import math
import os
import sys

try:
  import performer  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: notebooks/ is beside performer/
  sys.path.insert(0, os.path.abspath('..'))

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from matplotlib import colors

from performer import data, models, plot, sampling, tasks
from performer.convert import llama as convert_llama
from performer.convert import pretrained
from performer.models import attention_maps
from performer.training import build, config_utils, restore, runs, sharding, steps, train_lib

RUNS = runs.NotebookRuns.from_env()  # PERFORMER_NOTEBOOK_QUICK and _WORKDIR
PROMPT = 'The capital of France is'
print(f'workdir {RUNS.work}; quick={RUNS.quick}')


# %% [markdown]
# ## The model to convert
# Full mode: the config as it is. Quick mode: a random 1-layer Llama (4 query
# / 2 kv heads, d=32) written as a GGUF with a 64-token BPE vocabulary, the
# same way llama.cpp writes one, and a corpus of random words; the overrides
# only shrink sizes and steps, so every later cell runs the same code.


# %%
def write_tiny_llama(folder, seed=0):
  """A random Llama GGUF and a toy text corpus in `folder`; returns their paths."""
  import gguf

  os.makedirs(folder, exist_ok=True)
  fields = dict(vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=2, emb_dim=32)
  fields.update(mlp_dim=48, max_len=64, rope_theta=500.0, norm_eps=1e-5)
  cfg = convert_llama.llama_config(fields)
  path = os.path.join(folder, 'tiny_llama.gguf')
  w = gguf.GGUFWriter(path, 'llama')
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_len)
  w.add_embedding_length(cfg.emb_dim)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('smollm')
  w.add_token_list([chr(c) for c in range(63, 123)] + ['Ġ', 'ab', 'Ġa', '<|endoftext|>'])
  w.add_token_merges(['a b', 'Ġ a'])
  w.add_token_types([1] * 63 + [3])
  rng = np.random.default_rng(seed)
  for e in convert_llama.llama_keymap(cfg, 'gguf'):
    norm = 'norm' in e.source  # RMSNorm gains near 1, other weights small
    arr = float(norm) + (1.0 if norm else 0.3) * rng.standard_normal(e.shape)
    w.add_tensor(e.source, arr.astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  words = ('ab', 'a', 'cab', 'bad', 'dab', 'zap', 'yak', 'max', 'jazz', 'quiz')
  lines = [' '.join(rng.choice(words, rng.integers(4, 12))) for _ in range(400)]
  text = os.path.join(folder, 'corpus.txt')
  with open(text, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return path, text


if RUNS.quick:
  gguf_path, text_path = write_tiny_llama(os.path.join(RUNS.work, 'tiny_llama'))
  overrides = [
    f'train.init_from=gguf:{gguf_path}',  # distill_from and data.tokenizer follow it
    'data.name=text',
    f'data.path={text_path}',
    'data.seq_len=16',
    'model.attention.window=4',
    'model.lora_rank=2',
    'train.batch_size=4',
    'train.transfer_steps=4',
    'train.transfer_learning_rate=0.05',
    'train.num_steps=6',
    'train.warmup_steps=1',
    'train.log_every=2',
    'train.eval_every=2',
    'train.eval_batches=0',
    'train.checkpoint_every=4',
  ]
else:
  overrides = []
config = config_utils.load_config(os.path.join(runs.CONFIG_DIR, 'linearize_smollm2.py'), overrides)
tc = config.train
# Keep every checkpoint: the one at the end of the transfer stage is drawn below.
config.train.keep_checkpoints = tc.num_steps // tc.checkpoint_every + 1
print(
  f'{tc.init_from}: {config.model.attention.kind} + softmax window '
  f'{config.model.attention.window}; {tc.transfer_steps} transfer steps, then '
  f'{tc.num_steps - tc.transfer_steps} LoRA steps of {tc.batch_size} x {config.data.seq_len}'
)

# %% [markdown]
# ## Converting
# One ordinary training run does both stages (checkpoints, resume, metrics in
# `metrics.jsonl`). A finished run in the workdir is reused.

# %%
workdir = os.environ.get('PERFORMER_LINEARIZE_WORKDIR') or RUNS.workdir('linearize_smollm2')
if not runs.is_finished(workdir, tc.num_steps):
  train_lib.train_and_evaluate(config, workdir, progress=False)
print(f'{workdir}: finished at step {tc.num_steps}')

# %% [markdown]
# ## The references: step 0 and the softmax original
# The loop evaluates only during training. Here the same eval runs on the
# two models the curve is measured against: the converted model at step 0
# (imported weights, Hedgehog maps at their identity initialisation) and the
# softmax original (the distillation teacher), on the same validation batches.

# %%
cfg, vocab = build.resolve_config(config)  # sizes filled in from the checkpoint
source = cfg.train.init_from
batch_sharding = sharding.batch_sharding(sharding.make_mesh(cfg.mesh))


def imported(model_config):
  """A model of `model_config` with the weights of `source` (feature maps, window gains
  and LoRA factors, which it lacks, keep their initial values)."""
  model = models.build_model(model_config, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))
  pretrained.load_pretrained(pretrained.open_pretrained(source), model)
  return model


def evaluate(model, split='validation'):
  """The training loop's own eval (train_lib.evaluate) of `model`."""
  task = tasks.for_run(cfg.model, cfg.train, vocab)
  eval_fn = steps.make_eval_fn(models.split(model)[0], task)
  return train_lib.evaluate(
    eval_fn,
    steps.model_state(model),
    cfg,
    split,
    batch_sharding=batch_sharding,
    eval_key=jax.random.key(cfg.seed),
    num_batches=cfg.train.eval_batches,
  )


original_config = cfg.copy_and_resolve_references()  # what distillation's teacher is
original_config.model.attention.kind = 'softmax'
original_config.model.attention.window = 0
original_config.model.lora_rank = 0
original_model, before_model = imported(original_config.model), imported(cfg.model)
original, step0 = evaluate(original_model), evaluate(before_model)
print(f'softmax original: validation perplexity {original["perplexity"]:.3f}')
print(f'converted, step 0: validation perplexity {step0["perplexity"]:.3f}')

# %% [markdown]
# ## Perplexity against conversion steps
# The periodic evals and the final one from `metrics.jsonl`, after step 0.
# Attention transfer never looks at the next-token loss, so its perplexity
# moves only as far as the layers' outputs approach the original's; the LoRA
# stage then optimises it (with the original's logits as soft targets).

# %%
eval_steps, ppl = runs.curve(workdir, 'perplexity')
curve_steps, curve_ppl = [0] + eval_steps, [step0['perplexity']] + ppl
fig, ax = plt.subplots(figsize=(7, 4.2))
ax.axvspan(0, tc.transfer_steps, color='tab:orange', alpha=0.08, label='attention transfer')
ax.axvspan(tc.transfer_steps, tc.num_steps, color='tab:green', alpha=0.08, label='LoRA')
ax.axvline(tc.transfer_steps, color='grey', linestyle='--')
ax.plot(curve_steps, curve_ppl, marker='o', label=f'{cfg.model.attention.kind} + window')
ax.axhline(original['perplexity'], color='black', linestyle=':', label='softmax original')
if max(curve_ppl) > 10 * original['perplexity']:  # a start far above the original
  ax.set_yscale('log')
ax.set_xlabel('conversion step')
ax.set_ylabel('validation perplexity')
ax.grid(True, alpha=0.3)
ax.legend()
plot.show(fig, 'linearization_curve')  # saved too when PERFORMER_FIGURES_DIR is set
for s, p in zip(curve_steps, curve_ppl):
  stage = 'start' if s == 0 else 'transfer' if s <= tc.transfer_steps else 'LoRA'
  print(f'step {s:4d} ({stage}): perplexity {p:.3f}')

# %% [markdown]
# ## Where the linear part acts
# Query n attends linearly only to keys more than `window` tokens back, so
# a query within the first `window` tokens of its example attends exactly
# as softmax does. The share of validation tokens past the window is how much
# of the curve above the conversion can move at all.

# %%
W = cfg.model.attention.window
past = total = 0
for batch in data.build_dataset(cfg.data, split='validation', batch_size=8, seed=0, num_epochs=1):
  segments = batch.get('segment_ids', batch['mask'].astype(np.int32))
  for seg, m in zip(segments, batch['mask']):
    _, lengths = np.unique(seg[m], return_counts=True)  # tokens of each example in the row
    past += int(np.maximum(lengths - W, 0).sum())
    total += int(m.sum())
print(
  f'{past} of {total} validation tokens ({past / total:.1%}) are {W}+ tokens into their '
  'example: only their attention has a linear part'
)

# %% [markdown]
# ## Attention maps before and after the transfer
# A held-out text: the first validation example that fills a whole row
# (`data.seq_len` tokens of one document), longer than the window, so that
# the queries past the window also attend linearly (keys left of the dashed line).
# `attention_maps` rebuilds each layer's matrix from the q, k it is called
# with: exact softmax for the original; for the converted model, the window
# part and the row-normalised phi(q) phi(k)^T beyond it. Shown is the head
# whose map the transfer had the most to fix (largest distance to the
# original's before it), with the mean total-variation distance of its rows.


# %%
def held_out_text(length):
  """The first validation row that is one example of `length` tokens; failing that,
  the validation tokens joined."""
  stream = []
  for batch in data.build_dataset(cfg.data, split='validation', batch_size=4, seed=0, num_epochs=1):
    segments = batch.get('segment_ids', batch['mask'].astype(np.int32))
    for row, m, seg in zip(batch['tokens'], batch['mask'], segments):
      if len(row) >= length and m.all() and (seg == seg[0]).all():
        return np.asarray(row[:length], np.int32)
      stream += row[m].tolist()
  return np.asarray(stream[:length], np.int32)


tokens = held_out_text(cfg.data.seq_len)[None]
print(repr(vocab.decode(tokens[0].tolist())[:300]))

transfer_dir = os.path.join(workdir, 'checkpoints', str(tc.transfer_steps))
if os.path.isdir(transfer_dir):
  restored = restore.restore(transfer_dir)
  after_model, after_step = restored.model(), restored.step
  after_label = f'after transfer (step {after_step})'
else:  # a train.py run with keep_checkpoints=1 keeps only its last step
  restored = restore.restore(workdir)
  after_model, after_step = restored.model(), restored.step
  after_label = f'after both stages (step {after_step})'
  print(f'NOTE: no checkpoint at step {tc.transfer_steps}; showing step {after_step}')


@functools.partial(jax.jit, static_argnums=0)
def head_maps(graphdef, state, tokens):
  """[layers, heads, L, L] attention maps of one sequence (jitted: one compile per model)."""
  return attention_maps.attention_maps(nnx.merge(graphdef, state), tokens)[1][:, 0]


models_ = {
  'softmax original': original_model,
  'before transfer (step 0)': before_model,
  after_label: after_model,
}
maps = {k: np.asarray(head_maps(*nnx.split(m), tokens)) for k, m in models_.items()}
ref, before, after = maps.values()  # each [layers, heads, L, L]

# %%
L = cfg.data.seq_len
tv = lambda a: 0.5 * np.abs(a - ref)[..., W:, :].sum(-1).mean(-1)  # rows with a linear part
tv_before, tv_after = tv(before), tv(after)
layer, head = np.unravel_index(np.argmax(tv_before), tv_before.shape)
fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
norm = colors.PowerNorm(gamma=0.4, vmin=0.0, vmax=float(ref[layer, head].max()))
for ax, (label, m) in zip(axes, maps.items()):
  image = ax.imshow(m[layer, head], cmap='viridis', norm=norm)
  rows = np.arange(W, L)
  ax.plot(rows - W + 0.5, rows, color='white', linestyle='--', linewidth=0.8)
  dist = '' if m is ref else f'\nmean row TV to softmax {tv(m)[layer, head]:.3f}'
  ax.set_title(f'{label}{dist}', fontsize=10)
  ax.set_xlabel('key')
axes[0].set_ylabel('query')
fig.colorbar(image, ax=axes, shrink=0.8)
fig.suptitle(f'layer {layer}, head {head} (window {W})')
plot.show(fig, 'linearization_attention_map')  # saved too when PERFORMER_FIGURES_DIR is set
print(
  f'layer {layer} head {head}: TV to softmax {tv_before[layer, head]:.4f} -> '
  f'{tv_after[layer, head]:.4f}'
)
print(f'all heads, mean: TV to softmax {tv_before.mean():.4f} -> {tv_after.mean():.4f}')
in_window = max(float(np.abs(m - ref)[..., :W, :].max()) for m in (before, after))
print(f'queries 0..{W - 1} (no linear part): max difference to softmax {in_window:.1e}')

# %% [markdown]
# ## Decoding as an RNN
# `sampling.generate` on the final checkpoint: a prefill, then one step per
# token carrying a W-entry ring buffer of keys and values plus Hedgehog's
# (S, z) state per layer, so memory does not grow with the context. The
# greedy tokens are checked against the argmax of the parallel forward pass
# over the same sequence.

# %%
restored = restore.restore(workdir)
model, final_step = restored.model(), restored.step
bos = getattr(vocab, 'bos_id', None)
prompt = ([bos] if bos is not None else []) + list(vocab.encode(PROMPT))
out, n = sampling.generate(
  model,
  np.asarray([prompt]),
  max_new_tokens=8,
  temperature=0.0,
  eos_id=getattr(vocab, 'eos_id', None),
)
out, n = np.asarray(out)[0], int(n[0])
new = out[len(prompt) : n].tolist()
graphdef, weights = nnx.split(model)
forward = jax.jit(lambda w, t: nnx.merge(graphdef, w)(t, deterministic=True)[0])
logits = np.asarray(forward(weights, out[None, :n]))[0]
rnn_matches = bool((logits[len(prompt) - 1 : n - 1].argmax(-1) == new).all())
completion = vocab.decode(new)
print(f'step {final_step}, greedy: {PROMPT!r} -> {completion!r}')
print(f'recurrent decoding == parallel forward argmax: {rnn_matches}')

# %% [markdown]
# ## Key numbers
# Also written to `$PERFORMER_NOTEBOOK_WORKDIR/linearize_<quick|full>.json`.

# %%
summary = {
  'workdir': workdir,
  'transfer_steps': tc.transfer_steps,
  'num_steps': tc.num_steps,
  'steps': curve_steps,
  'perplexity': curve_ppl,
  'softmax_perplexity': original['perplexity'],
  'map_layer_head': [int(layer), int(head)],
  'map_after_step': after_step,
  'map_max_change': float(np.abs(after - before).max()),
  'tv_before': float(tv_before.mean()),
  'tv_after': float(tv_after.mean()),
  'in_window_max_diff': in_window,
  'tokens_past_window': past / total,
  'prompt': PROMPT,
  'completion': completion,
  'rnn_matches_parallel': rnn_matches,
}
assert all(math.isfinite(p) for p in curve_ppl + [original['perplexity']])
os.makedirs(RUNS.work, exist_ok=True)  # a reused PERFORMER_LINEARIZE_WORKDIR never made it
with open(os.path.join(RUNS.work, f'linearize_{RUNS.tag}.json'), 'w', encoding='utf-8') as f:
  json.dump(summary, f, indent=1)
for key, value in summary.items():
  print(f'{key}: {value}')
