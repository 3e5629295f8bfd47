"""Transformer building blocks whose attention is chosen by name.

The point of this zoo is that one parameter set works with every attention
kind (softmax, FAVOR+ variants, learned feature maps, linear, identity): a
softmax checkpoint loads into a Performer unchanged. So the layers here never
branch on the kind. The attention layer builds its kind's module once, with
`make_attention(head_dim=, num_heads=, rngs=)` (a partial of
`attention.build`), and every kind-dependent variable lives inside that
module, typed by what training must do with it: `attention.RandomFeatures`
(redrawn, never trained), `attention.FeatureParam` (trained, absent from
pretrained checkpoints), `attention.FeatureStats` (running statistics).

Norm and MLP are separate small modules built by plain functions, so later
blocks (post-LN BERT, Llama RMSNorm/SwiGLU/GQA) can swap them without
touching attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from performer.models import positions as positions_lib


class MultiHeadAttention(nnx.Module):
  """q, k, v, o projections around a pluggable `attend` function.

  Projections are `nnx.LinearGeneral` with the head axis explicit, so q, k, v
  come out as [batch, length, heads, head_dim] -- the layout every attend
  function takes -- without reshapes. Rotary positions, when enabled, rotate
  q and k here, before `attend` applies any feature map.

  Kernels are float32 parameters; `dtype` is the compute dtype of the
  projections (bf16 halves activation memory). `attend` returns v.dtype and
  keeps its own exp/normaliser in float32 (attention library's contract).
  """

  def __init__(
    self,
    emb_dim: int,
    num_heads: int,
    *,
    make_attention,
    causal: bool,
    rotary: bool = False,
    use_bias: bool = True,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if emb_dim % num_heads:
      raise ValueError(f'emb_dim {emb_dim} is not divisible by num_heads {num_heads}')
    self.num_heads = num_heads
    self.head_dim = head_dim = emb_dim // num_heads
    self.causal = causal
    self.rotary = rotary

    def proj_in():
      return nnx.LinearGeneral(
        emb_dim, (num_heads, head_dim), use_bias=use_bias, dtype=dtype, rngs=rngs
      )

    self.query = proj_in()
    self.key = proj_in()
    self.value = proj_in()
    self.out = nnx.LinearGeneral(
      (num_heads, head_dim), emb_dim, axis=(-2, -1), use_bias=use_bias, dtype=dtype, rngs=rngs
    )
    self.attend = make_attention(head_dim=head_dim, num_heads=num_heads, rngs=rngs)

  def _qkv(self, x, positions):
    q, k, v = self.query(x), self.key(x), self.value(x)
    if self.rotary:
      if positions is None:
        raise ValueError('rotary attention needs positions')
      q = positions_lib.apply_rope(q, positions)
      k = positions_lib.apply_rope(k, positions)
    return q, k, v

  def __call__(self, x: jax.Array, *, mask=None, segment_ids=None, positions=None) -> jax.Array:
    q, k, v = self._qkv(x, positions)
    y = self.attend(q, k, v, causal=self.causal, mask=mask, segment_ids=segment_ids)
    return self.out(y)

  # Decoding. The cache is whatever the attend module keeps: (S, z, M) for
  # feature-map kinds (fixed size), a KV cache of `max_length` for softmax,
  # nothing for identity. This layer only projects and rotates, so it needs no
  # knowledge of the kind.
  def init_cache(self, batch: int, max_length: int, dtype=jnp.float32):
    """Empty decoding state for `batch` rows; `max_length` sizes a KV cache."""
    return self.attend.init_state(batch, self.head_dim, max_length=max_length, dtype=dtype)

  def prefill(self, x: jax.Array, cache, *, mask=None, positions=None):
    """Causal pass over a prompt x [B, L, D] -> (out [B, L, D], cache)."""
    q, k, v = self._qkv(x, positions)
    y, cache = self.attend.prefill(cache, q, k, v, mask=mask)
    return self.out(y), cache

  def decode_step(self, x: jax.Array, cache, *, positions=None):
    """One token per row, x [B, D] at absolute `positions` [B] -> (out, cache)."""
    q, k, v = self._qkv(x[:, None], None if positions is None else positions[:, None])
    y, cache = self.attend.step(cache, q[:, 0], k[:, 0], v[:, 0])
    return self.out(y), cache


class Mlp(nnx.Module):
  """Two-layer GELU feed-forward: Linear(d->mlp_dim), GELU, Linear(mlp_dim->d)."""

  def __init__(self, emb_dim: int, mlp_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.up = nnx.Linear(emb_dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(mlp_dim, emb_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


def layer_norm(dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm in the compute dtype; Flax computes its statistics in float32."""
  return nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)


class TransformerBlock(nnx.Module):
  """Pre-LayerNorm block: x + Drop(Attn(LN(x))), then x + Drop(MLP(LN(x))).

  Pre-LN keeps the residual stream un-normalised, which trains stably without
  warmup tricks at the depths used here; the model applies one final
  LayerNorm after the last block. Dropout is residual dropout only: FAVOR+
  never forms attention probabilities, so there is nothing to drop there.
  """

  def __init__(
    self,
    emb_dim: int,
    num_heads: int,
    mlp_dim: int,
    *,
    make_attention,
    causal: bool,
    rotary: bool = False,
    dropout_rate: float = 0.0,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.attn_norm = layer_norm(emb_dim, dtype=dtype, rngs=rngs)
    self.attn = MultiHeadAttention(
      emb_dim,
      num_heads,
      make_attention=make_attention,
      causal=causal,
      rotary=rotary,
      dtype=dtype,
      rngs=rngs,
    )
    self.attn_dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.mlp_norm = layer_norm(emb_dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(emb_dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(
    self,
    x: jax.Array,
    *,
    mask=None,
    segment_ids=None,
    positions=None,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    h = self.attn(self.attn_norm(x), mask=mask, segment_ids=segment_ids, positions=positions)
    x = x + self.attn_dropout(h, deterministic=deterministic, rngs=rngs)
    h = self.mlp(self.mlp_norm(x))
    return x + self.mlp_dropout(h, deterministic=deterministic, rngs=rngs)

  def prefill(self, x, cache, *, mask=None, positions=None):
    """Inference-only (no dropout) causal pass that also returns the cache."""
    h, cache = self.attn.prefill(self.attn_norm(x), cache, mask=mask, positions=positions)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache

  def decode_step(self, x, cache, *, positions=None):
    """One token per row, x [B, D]: the recurrent form of `prefill`."""
    h, cache = self.attn.decode_step(self.attn_norm(x), cache, positions=positions)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache
