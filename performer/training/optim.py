"""The optimizer, its schedule, and which parameters each stage may change.

A run has up to two stages. Attention transfer (the first `train.transfer_steps`
steps, LoLCATs' stage 1) trains only the attention modules' own parameters
(`attention.FeatureParam`: Hedgehog's maps, window gains) at its own constant
learning rate; the rest of the run trains `train.trainable`: 'all', or 'lora'
(only `models.LoraParam`). A stage's frozen parameters get no gradient (stop_gradient,
so XLA drops their weight-gradient matmuls) and are carried over bitwise; Adam keeps
moments only for parameters that some stage trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from performer import attention, models

TRAINABLE = ('all', 'lora', 'feature_maps')


def make_schedule(train_config):
  """Linear warmup from 0, then cosine decay to 0 at num_steps (or constant); after
  `transfer_steps` of constant `transfer_learning_rate` when a transfer stage runs."""
  lr, warmup = train_config.learning_rate, train_config.warmup_steps
  first = train_config.get('transfer_steps', 0)
  steps = train_config.num_steps - first
  if train_config.schedule == 'cosine':
    main = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=0.0
    )
  else:
    main = optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
    )
  if not first:
    return main
  transfer = optax.constant_schedule(float(train_config.transfer_learning_rate))
  return optax.join_schedules([transfer, main], [first])


def _decay_mask(params):
  """Weight decay on matrices only: biases and norm scales are not decayed."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def trainable_flags(params, which):
  """One bool per leaf of `params` (an nnx.State of Params): may `which` change it?"""
  if which not in TRAINABLE:
    raise ValueError(f'trainable must be one of {TRAINABLE}, got {which!r}')
  kinds = {'feature_maps': attention.FeatureParam, 'lora': models.LoraParam}
  variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return tuple(which == 'all' or isinstance(v, kinds[which]) for v in variables)


def stage_flags(params, train_config):
  """{'transfer': flags or None, 'train': flags}: what each stage trains."""
  transfer = None
  if train_config.get('transfer_steps', 0):
    transfer = trainable_flags(params, 'feature_maps')
  return {'transfer': transfer, 'train': trainable_flags(params, train_config.trainable)}


def make_optimizer(train_config, flags=None):
  """AdamW with global-norm clipping; returns (optax transform, schedule). With
  `flags` (stage_flags), moments are kept only for parameters some stage trains."""
  schedule = make_schedule(train_config)
  adamw = optax.adamw(
    schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=train_config.weight_decay, mask=_decay_mask
  )
  if flags is not None:
    union = [any(f) for f in zip(*(s for s in flags.values() if s is not None))]
    if not all(union):
      adamw = optax.masked(adamw, lambda params: _tree_like(params, union))
  parts = [optax.clip_by_global_norm(train_config.grad_clip)] if train_config.grad_clip > 0 else []
  return optax.chain(*parts, adamw), schedule


def _tree_like(params, flags):
  return jax.tree.unflatten(jax.tree.structure(params), list(flags))


def freeze(params, flags):
  """`params` with the leaves `flags` leaves out behind stop_gradient."""
  if flags is None or all(flags):
    return params
  leaves, treedef = jax.tree.flatten(params)
  kept = [x if f else jax.lax.stop_gradient(x) for x, f in zip(leaves, flags)]
  return jax.tree.unflatten(treedef, kept)


def keep_frozen(new, old, flags):
  """`new` with the leaves `flags` leaves out taken bitwise from `old`."""
  if flags is None or all(flags):
    return new
  new_leaves, treedef = jax.tree.flatten(new)
  old_leaves = jax.tree.leaves(old)
  return jax.tree.unflatten(
    treedef, [n if f else o for n, o, f in zip(new_leaves, old_leaves, flags)]
  )
