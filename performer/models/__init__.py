"""Model families (our Transformer, Llama, BERT) behind one contract.

    from performer import models
    model = models.build_model(config.model, rngs=nnx.Rngs(params=0, dropout=1))
    logits, _ = model(tokens, mask=None, segment_ids=None, positions=None,
                      deterministic=True)       # float32 [B, L, vocab_size]
    cache = model.init_cache(batch, max_length)  # causal models: decode
    logits, cache = model(prompt, mask=mask, cache=cache)

`config.model.family` picks the family (families.py), the attention kind is a
config string, and no model branches on it (see `layers.py`). `split(model)` separates what training treats differently:
parameters (feature-map parameters included), random projections (redrawn),
running statistics (updated by train steps) and the rest. With `lora_rank` > 0 the
attention projections carry LoRA factors (`LoraParam`, lora.py); `merge_lora` folds them
back into the kernels.
"""

from __future__ import annotations

import jax
from flax import nnx

from performer import attention
from performer.models.config import DTYPES, POSITIONS, AttentionSpec, ModelConfig, ModelConfigError
from performer.models.families import (
  FAMILIES,
  architectures,
  build_model,
  family_of_architecture,
  model_config,
)
from performer.models.layers import capture_intermediates
from performer.models.lora import LoraParam, merge_lora
from performer.models.positions import (
  POSITION_KINDS,
  apply_rope,
  positions_from_segments,
  sinusoidal,
)
from performer.models.short_conv import ConvParam
from performer.models.transformer import Transformer, check_tokens, shift_right


def split(model: nnx.Module):
  """(graphdef, params, projections, stats, rest) of `model`:

  params       nnx.Param (attention.FeatureParam, LoraParam, ConvParam included) -> trained
  projections  attention.RandomProjection: the random matrices -> redrawn, never trained
  stats        attention.FeatureStats                          -> updated by train steps
  rest         everything else (RNG streams)

  "Features" means one thing in the zoo: phi(x), the feature vectors a feature map makes
  (`LinearAttention.features`); the random matrices that make them are projections.

  `nnx.merge(graphdef, params, projections, stats, rest)` rebuilds the model.
  """
  return nnx.split(model, nnx.Param, attention.RandomProjection, attention.FeatureStats, ...)


def feature_map_params(model: nnx.Module) -> list[str]:
  """Dotted paths of the feature-map parameters (`attention.FeatureParam`, e.g.
  'layers.0.attn.attend.feature_map.query_weight'): no pretrained or softmax
  checkpoint holds them, so importers and init_from expect them missing (with the
  LoRA factors: `new_params`)."""
  return sorted(
    '.'.join(str(p) for p in path)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, attention.FeatureParam)
  )


# Parameter types no pretrained checkpoint holds (an nnx filter: nnx.state(model, NEW_PARAMS)).
NEW_PARAMS = (attention.FeatureParam, LoraParam, ConvParam)


def new_params(model: nnx.Module) -> list[str]:
  """Dotted paths of every parameter no pretrained or softmax checkpoint holds:
  feature-map parameters (`feature_map_params`), LoRA factors ('layers.0.attn.query.lora_a')
  and short-convolution kernels.
  Importers and init_from keep their initial values and report them as expected-missing."""
  return sorted(
    '.'.join(str(p) for p in path)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, NEW_PARAMS)
  )


def param_count(model: nnx.Module) -> int:
  """Number of trainable scalars (nnx.Param only; random features excluded)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = [
  'DTYPES',
  'FAMILIES',
  'NEW_PARAMS',
  'POSITIONS',
  'POSITION_KINDS',
  'AttentionSpec',
  'LoraParam',
  'ModelConfig',
  'ModelConfigError',
  'Transformer',
  'apply_rope',
  'architectures',
  'build_model',
  'capture_intermediates',
  'check_tokens',
  'family_of_architecture',
  'feature_map_params',
  'merge_lora',
  'model_config',
  'new_params',
  'param_count',
  'positions_from_segments',
  'shift_right',
  'sinusoidal',
  'split',
]
