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
# # 4. From Transformer to Performer
#
# Every attention kind in the zoo uses the same parameters (the kind only
# decides how q, k and v are combined), so a trained softmax checkpoint loads
# into a Performer unchanged: `config.train.init_from=<softmax workdir>` takes
# the parameters by name and draws fresh random features. The Performer paper
# (Sec. 4.3) shows that such a model needs only a little fine-tuning to
# recover its accuracy.
#
# Here: a small softmax causal protein LM (notebook 3's Transformer, same
# settings) is the teacher. We
#
# 1. evaluate its weights with FAVOR+ attention and no fine-tuning at all,
# 2. fine-tune them as a `favor_softmax` model and track held-out accuracy
#    against the fine-tuning steps, beside a Performer trained from scratch for
#    the same number of steps (notebook 3's Performer), and
# 3. repeat the fine-tuning with the teacher's logits as soft targets
#    (distillation).
#
# Runs are cached in `PERFORMER_NOTEBOOK_WORKDIR` and shared with notebooks 3
# and 5. `PERFORMER_NOTEBOOK_QUICK=1` uses a tiny model and 30 steps.
# (Transferring the imported MiniLM instead needs its weights, which this
# notebook does not download.)

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
import ml_collections
from flax import nnx

from performer import data, models, plot, tasks
from performer.training import restore, runs, steps

# The same settings (from the environment) in notebooks 3, 4 and 5, so their runs are shared.
RUNS = runs.NotebookRuns.from_env()
print(f'workdir {RUNS.work}; quick={RUNS.quick}')


def evaluate(model, config, split='validation'):
  """Held-out metrics of `model` with the training code's own eval step."""
  vocab = data.vocab_for(config.data)
  task = tasks.for_run(config.model, config.train, vocab)
  eval_fn, state = steps.make_eval_fn(models.split(model)[0], task), steps.model_state(model)
  totals = None
  for i, batch in enumerate(
    data.build_dataset(
      config.data, split=split, batch_size=config.train.batch_size, seed=config.seed, num_epochs=1
    )
  ):
    sums = eval_fn(state, batch, jax.random.fold_in(jax.random.key(0), i))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return task.summary(jax.device_get(totals))


# %% [markdown]
# ## The teacher, and the Performer trained from scratch
# Both are notebook 3's runs (trained here if that notebook has not run).

# %%
teacher_dir = RUNS.train('protein_softmax', 'protein_transformer_uni.py')
scratch_dir = RUNS.train('protein_favor', 'default.py')
restored = restore.restore(teacher_dir)
teacher, teacher_config = restored.model(), restored.config
teacher_result = runs.final_metrics(teacher_dir)
print(f'teacher (softmax): validation accuracy {teacher_result["accuracy"]:.4f}')

# %% [markdown]
# ## Zero-shot: the softmax weights with FAVOR+ attention
# Same parameters, attention swapped, fresh random features, no training.

# %%
student_config = ml_collections.ConfigDict(teacher_config.to_dict())
student_config.model.attention.kind = 'favor_softmax'
student = models.build_model(student_config.model, rngs=nnx.Rngs(params=0, dropout=1))
nnx.update(student, nnx.state(teacher, nnx.Param))
zero_shot = evaluate(student, student_config)
teacher_check = evaluate(teacher, teacher_config)
print(f'teacher re-evaluated here: accuracy {teacher_check["accuracy"]:.4f}')
print(
  f'softmax weights + favor_softmax, no fine-tuning: accuracy {zero_shot["accuracy"]:.4f}, '
  f'perplexity {zero_shot["perplexity"]:.3f}'
)

# %% [markdown]
# ## Fine-tuning
# The Performer config with `train.init_from` = the teacher's workdir and
# otherwise exactly the from-scratch settings (same steps, schedule and
# learning rate), so the two curves differ only in the starting parameters.

# %%
finetune_dir = RUNS.train(
  'protein_favor_from_softmax', 'default.py', [f'train.init_from={teacher_dir}']
)
steps_f, acc_f = runs.curve(finetune_dir)
curves = {
  'fine-tuned from softmax': ([0] + steps_f, [zero_shot['accuracy']] + acc_f),
  'Performer from scratch': runs.curve(scratch_dir),
}

# %% [markdown]
# ## With distillation
# The same fine-tuning with the training loop's distillation loss:
# `train.distill_from` = the teacher's workdir adds, per token,
# `distill_weight` x T^2 KL(teacher || student) on the logits (defaults:
# weight 1, temperature 1) to the cross-entropy. On a checkout whose config
# has no `distill_from` key the cell is skipped with a note.

# %%
distill_keys = [k for k in RUNS.config('default.py').train.keys() if 'distill' in k]
if 'distill_from' in distill_keys:
  distill_dir = RUNS.train(
    'protein_favor_distilled',
    'default.py',
    [f'train.init_from={teacher_dir}', f'train.distill_from={teacher_dir}'],
  )
  steps_d, acc_d = runs.curve(distill_dir)
  curves['fine-tuned + distillation'] = ([0] + steps_d, [zero_shot['accuracy']] + acc_d)
else:
  print(
    'NOTE: skipped -- config.train has no distill_from key '
    f'(found: {distill_keys or "none"}); the curve is without distillation only.'
  )

# %%
fig, ax = plt.subplots(figsize=(7, 4.2))
for label, (xs, ys) in curves.items():
  ax.plot(xs, ys, marker='o', label=label)
ax.axhline(teacher_result['accuracy'], color='black', linestyle=':', label='softmax teacher')
ax.set_xlabel('fine-tuning steps')
ax.set_ylabel('validation accuracy')
ax.set_title('softmax Transformer -> Performer (favor_softmax)')
ax.grid(True, alpha=0.3)
ax.legend()
plot.show(fig, 'transformer_to_performer')  # saved too when PERFORMER_FIGURES_DIR is set

# %% [markdown]
# ## Key numbers

# %%
print(f'teacher (softmax) accuracy: {teacher_result["accuracy"]:.4f}')
print(f"zero-shot favor_softmax with the teacher's weights: {zero_shot['accuracy']:.4f}")
for label, (xs, ys) in curves.items():
  print(f'{label}: ' + ', '.join(f'step {x}: {y:.4f}' for x, y in zip(xs, ys)))
