"""Performer Transformer models: causal LM, masked LM, autoregressive images.

    from performer import models
    model = models.build_model(config.model, rngs=nnx.Rngs(params=0, dropout=1))
    logits = model(tokens, mask=None, segment_ids=None, positions=None,
                   deterministic=True)          # float32 [B, L, vocab_size]

The attention kind is a config string; the model never branches on it (see
`blocks.py`). `split(model)` separates what training treats differently:
parameters (feature-map parameters included), random features (redrawn),
running statistics (updated by train steps) and the rest.
"""

from __future__ import annotations

import jax
from flax import nnx

from performer import attention
from performer.models.positions import (
  POSITION_KINDS,
  apply_rope,
  positions_from_segments,
  sinusoidal,
)
from performer.models.transformer import (
  TASKS,
  ModelSpec,
  Transformer,
  check_tokens,
  shift_right,
  spec_from_config,
)


def build_model(model_config, *, rngs: nnx.Rngs) -> Transformer:
  """Build the model for `model_config.task` ('causal_lm', 'mlm', 'image_ar').

  All tasks share one class (`Transformer`); the task sets causality, the
  image input shift and `model.target_offset` (1: logits[t] predict
  tokens[t+1]; 0: they predict tokens[t]). Raises ValueError for an unknown
  task (listing the valid ones) or an inconsistent config.
  """
  return Transformer(spec_from_config(model_config), rngs=rngs)


def split(model: nnx.Module):
  """(graphdef, params, features, stats, rest) of `model`:

  params    nnx.Param (attention.FeatureParam included)  -> trained
  features  attention.RandomFeatures                     -> redrawn, never trained
  stats     attention.FeatureStats                       -> updated by train steps
  rest      everything else (RNG streams)

  `nnx.merge(graphdef, params, features, stats, rest)` rebuilds the model.
  """
  return nnx.split(model, nnx.Param, attention.RandomFeatures, attention.FeatureStats, ...)


def feature_params(model: nnx.Module) -> list[str]:
  """Dotted paths of the feature-map parameters (`attention.FeatureParam`, e.g.
  'layers.0.attn.attend.feature_map.query_weight'): no pretrained or softmax
  checkpoint holds them, so importers and init_from expect them missing."""
  return sorted(
    '.'.join(str(p) for p in path)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, attention.FeatureParam)
  )


def param_count(model: nnx.Module) -> int:
  """Number of trainable scalars (nnx.Param only; random features excluded)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = [
  'POSITION_KINDS',
  'TASKS',
  'ModelSpec',
  'Transformer',
  'apply_rope',
  'build_model',
  'feature_params',
  'check_tokens',
  'param_count',
  'positions_from_segments',
  'shift_right',
  'sinusoidal',
  'spec_from_config',
  'split',
]
