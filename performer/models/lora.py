"""LoRA (Hu et al. 2021) on the attention projections: W + (alpha / r) A B.

A fine-tune of an imported checkpoint then trains 2 r (in + out) numbers per
projection instead of in * out. `LoraLinearGeneral` is an `nnx.LinearGeneral`
with two extra parameters, so the base `kernel` / `bias` keep their paths
('layers.0.attn.query.kernel') and every importer's key map loads unchanged:

  lora_a  [*in_features, r]   lecun normal over fan-in (the base kernel's init)
  lora_b  [r, *out_features]  zero, so at init the update is exactly 0 and the
                              model's output is that of the model without LoRA

For q / k / v that is A [emb, r], B [r, heads, head_dim]; for o, A [heads,
head_dim, r], B [r, emb]. Both are `LoraParam`s: an `nnx.Param` type of their
own, so training selects them by type (`nnx.state(model, LoraParam)`,
`training.optim.trainable_flags`) and no checkpoint is expected to hold them (`models.NEW_PARAMS`).

A draws its key beside the `params` stream without advancing it, so turning
LoRA on changes no other initial value (base kernels, random features).
`merge_lora` folds A B into the kernels for export and decoding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

# Folded into the params stream's key: LoRA keys never coincide with a counted draw.
_LORA_TAG = 0x4C6F5241  # 'LoRA'


class LoraParam(nnx.Param):
  """A LoRA factor: trained in a LoRA fine-tune, never in a pretrained checkpoint."""


def _side_key(rngs: nnx.Rngs) -> jax.Array:
  """A key unique to this point of the params stream that leaves the stream untouched:
  drawing from it would shift every later initial value of the model."""
  stream = rngs.params
  return jax.random.fold_in(jax.random.fold_in(stream.key[...], _LORA_TAG), stream.count[...])


class LoraLinearGeneral(nnx.LinearGeneral):
  """`nnx.LinearGeneral` plus a rank-`rank` update scaled by alpha / rank.

  Keeps the base class's head axes: inputs contract over `axis` with A's leading
  `in_features` axes; B's trailing axes are `out_features`, as in the kernel."""

  def __init__(self, in_features, out_features, *, rank: int, alpha: float, rngs, **kwargs):
    if kwargs.get('batch_axis'):
      raise ValueError('LoraLinearGeneral does not support batch_axis')
    if rank < 1:
      raise ValueError(f'LoRA rank must be >= 1, got {rank}')
    super().__init__(in_features, out_features, rngs=rngs, **kwargs)
    self.rank, self.scale = rank, alpha / rank
    fan_in = math.prod(self.in_features)
    a = nnx.initializers.lecun_normal()(_side_key(rngs), (fan_in, rank), self.param_dtype)
    self.lora_a = LoraParam(a.reshape(*self.in_features, rank))
    self.lora_b = LoraParam(jnp.zeros((rank, *self.out_features), self.param_dtype))

  def __call__(self, inputs, out_sharding=None):
    y = super().__call__(inputs, out_sharding=out_sharding)
    x, a, b = self.promote_dtype((inputs, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    axis = tuple(ax % inputs.ndim for ax in self.axis)
    h = jnp.tensordot(x, a, axes=(axis, tuple(range(len(axis)))), precision=self.precision)
    h = jnp.tensordot(h * jnp.asarray(self.scale, h.dtype), b, axes=1, precision=self.precision)
    return y + h.astype(y.dtype)  # B = 0: adds exact zeros

  def merged_kernel(self) -> jax.Array:
    """kernel + (alpha / r) A B in the kernel's dtype (float32)."""
    delta = jnp.tensordot(self.lora_a[...], self.lora_b[...], axes=1)
    return self.kernel[...] + (self.scale * delta).astype(self.kernel.dtype)

  def to_linear(self) -> nnx.LinearGeneral:
    """The plain `nnx.LinearGeneral` computing the same function (same paths)."""
    kernel = self.merged_kernel()
    bias = None if self.bias is None else self.bias[...]
    return nnx.LinearGeneral(
      self.in_features,
      self.out_features,
      axis=self.axis,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      promote_dtype=self.promote_dtype,
      dot_general=self.dot_general,
      dot_general_cls=self.dot_general_cls,
      preferred_element_type=self.preferred_element_type,
      kernel_init=lambda _, shape, dtype: kernel.reshape(shape).astype(dtype),
      bias_init=lambda _, shape, dtype: bias.reshape(shape).astype(dtype),
      rngs=nnx.Rngs(0),  # unused: both initializers return the given values
    )


def linear(cfg, in_features, out_features, *, rngs, **kwargs) -> nnx.LinearGeneral:
  """An attention projection: LoRA-augmented when `cfg.lora_rank` > 0, else plain."""
  if cfg.lora_rank:
    return LoraLinearGeneral(
      in_features, out_features, rank=cfg.lora_rank, alpha=cfg.lora_alpha, rngs=rngs, **kwargs
    )
  return nnx.LinearGeneral(in_features, out_features, rngs=rngs, **kwargs)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A copy of `model` with every A B folded into its kernel and `config.lora_rank`
  0: the model without LoRA that computes the same function, for export and decoding
  without the extra matmuls. Its state has exactly the paths of a model built with
  lora_rank 0 (random features, statistics and RNG streams are copied as they are)."""
  merged = nnx.clone(model)
  found = [
    (path, node) for path, node in nnx.iter_graph(merged) if isinstance(node, LoraLinearGeneral)
  ]
  for path, node in found:
    parent = merged
    for part in path[:-1]:
      parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    setattr(parent, path[-1], node.to_linear())
  config = getattr(merged, 'config', None)
  if config is not None and getattr(config, 'lora_rank', 0):
    merged.config = dataclasses.replace(config, lora_rank=0)
  return merged
