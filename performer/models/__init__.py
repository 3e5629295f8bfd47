"""Model families (our Transformer, Llama, BERT) behind one contract.

    from performer import models
    model = models.build_model(config.model, rngs=nnx.Rngs(params=0, dropout=1))
    logits, _ = model(tokens, mask=None, segment_ids=None, positions=None,
                      deterministic=True)       # float32 [B, L, vocab_size]
    cache = model.init_cache(batch, max_length)  # causal models: decode
    logits, cache = model(prompt, mask=mask, cache=cache)

`config.model.family` picks the family (families.py), the attention kind is a
config string, and no model branches on it (see `layers.py`). `split(model)` separates what training treats differently:
parameters (feature-map parameters included), random features (redrawn),
running statistics (updated by train steps) and the rest.
"""

from __future__ import annotations

import jax
from flax import nnx

from performer import attention
from performer.models.config import DTYPES, POSITIONS, TASKS, AttentionSpec, ModelConfig
from performer.models.families import FAMILIES, build_model, model_config
from performer.models.layers import capture_intermediates
from performer.models.positions import (
  POSITION_KINDS,
  apply_rope,
  positions_from_segments,
  sinusoidal,
)
from performer.models.transformer import Transformer, check_tokens, shift_right


def split(model: nnx.Module):
  """(graphdef, params, features, stats, rest) of `model`:

  params    nnx.Param (attention.FeatureParam included)  -> trained
  features  attention.RandomProjection  -> redrawn, never trained
  stats     attention.FeatureStats                       -> updated by train steps
  rest      everything else (RNG streams)

  `nnx.merge(graphdef, params, features, stats, rest)` rebuilds the model.
  """
  return nnx.split(model, nnx.Param, attention.RandomProjection, attention.FeatureStats, ...)


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
  'DTYPES',
  'FAMILIES',
  'POSITIONS',
  'POSITION_KINDS',
  'TASKS',
  'AttentionSpec',
  'ModelConfig',
  'Transformer',
  'apply_rope',
  'build_model',
  'capture_intermediates',
  'check_tokens',
  'feature_params',
  'model_config',
  'param_count',
  'positions_from_segments',
  'shift_right',
  'sinusoidal',
  'split',
]
