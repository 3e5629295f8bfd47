"""Position information for the Performer models.

Two families, because FAVOR+ attention constrains where positions can enter:

* **Additive embeddings** (learned, sinusoidal, axial) are added to the token
  embeddings once, before the first block. They work with every attention
  kind because attention never sees them separately.
* **Rotary** (RoPE) rotates q and k inside every attention layer *before* the
  attention kernel's feature map. That is the only place it can go for
  FAVOR+: the feature map phi(q)·phi(k) approximates exp(q·k), so the rotation
  must already be in q and k for the approximation to inherit the relative
  position property. There is no [L, L] score matrix to add a bias to.

All functions take **explicit integer positions** [batch, length] instead of
assuming arange(length). Packed sequences (several documents in one row) then
restart at 0 in every segment: see `positions_from_segments`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Additive kinds (a module adds an embedding) versus rotary (applied to q, k).
POSITION_KINDS = ('learned', 'sinusoidal', 'rotary', 'axial', 'none')

ROPE_BASE = 10000.0


def default_positions(batch: int, length: int) -> jax.Array:
  """Positions 0..length-1 for every row: the unpacked case."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Position of each token inside its segment (contiguous run of equal ids).

  Packed rows put several sequences side by side; each must see positions
  starting at 0, exactly as when it is run alone, otherwise packing changes
  what the model computes. A new segment starts wherever the id differs from
  the previous token's id. Works under jit (cummax, no Python loop).
  """
  segment_ids = jnp.asarray(segment_ids)
  length = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
    [
      jnp.ones_like(segment_ids[..., :1], dtype=bool),
      segment_ids[..., 1:] != segment_ids[..., :-1],
    ],
    axis=-1,
  )
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)
  return idx - start_idx


def sinusoidal(positions: jax.Array, dim: int, max_timescale: float = 10000.0) -> jax.Array:
  """Fixed sin/cos embedding [*, dim] of integer positions (Vaswani et al.).

  Computed from the positions on the fly (no table), so it works for any
  position, including restarted ones in packed rows. The first half of the
  features is sin, the second half cos, with geometric timescales from 1 to
  `max_timescale`. Odd `dim` gets a zero last feature.
  """
  half = dim // 2
  log_inc = math.log(max_timescale) / max(half - 1, 1)
  inv_timescales = jnp.exp(-log_inc * jnp.arange(half, dtype=jnp.float32))
  angles = positions.astype(jnp.float32)[..., None] * inv_timescales
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


def rope_angles(
  positions: jax.Array, head_dim: int, base: float = ROPE_BASE
) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [batch, length, 1, head_dim] for rotate-half RoPE.

  Frequency i (of head_dim/2) is base^(-2i/head_dim); the table repeats the
  half-size angles twice, matching the rotate-half pairing of feature j with
  feature j + head_dim/2 (the GPT-NeoX / Llama / HF convention, so imported
  Llama weights need no permutation).
  """
  if head_dim % 2:
    raise ValueError(f'rotary positions need an even head_dim, got {head_dim}')
  freqs = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, L, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
  """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = ROPE_BASE) -> jax.Array:
  """Rotate q or k [batch, length, heads, head_dim] by their positions.

  Rotation happens in float32 (angles for long sequences lose precision in
  bf16) and the result is cast back to x.dtype. After this, q_t·k_s depends on
  positions only through t - s, which is what lets a packed segment produce
  the same attention as an unpacked one.
  """
  cos, sin = rope_angles(positions, x.shape[-1], base)
  xf = x.astype(jnp.float32)
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


class LearnedPositions(nnx.Module):
  """A learned table [max_len, dim] indexed by position.

  For images this is the "full" (flat 2-D) option: one free vector for each
  of the H*W*C sub-pixel positions in raster order.
  """

  def __init__(self, max_len: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.max_len = max_len
    self.embed = nnx.Embed(
      max_len, dim, dtype=dtype, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
    )

  def __call__(self, positions: jax.Array) -> jax.Array:
    return self.embed(positions)


class SinusoidalPositions(nnx.Module):
  """Parameter-free wrapper of `sinusoidal` so all additive kinds look alike."""

  def __init__(self, dim: int, *, dtype=jnp.float32):
    self.dim = dim
    self.dtype = dtype

  def __call__(self, positions: jax.Array) -> jax.Array:
    return sinusoidal(positions, self.dim).astype(self.dtype)


class AxialPositions(nnx.Module):
  """Separate learned row, column and channel embeddings, summed.

  Flattened images are raster-ordered (row, then column, then channel), so
  flat position p is row p // (W*C), column (p // C) % W, channel p % C. A
  64x64x3 image (12,288 sub-pixels) then needs 64 + 64 + 3 vectors instead of
  12,288, and the model knows which sub-pixels share a row, column or colour.
  """

  def __init__(
    self, image_shape: tuple[int, int, int], dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs
  ):
    if len(image_shape) != 3:
      raise ValueError(
        f'axial positions need image_shape (height, width, channels), got {image_shape}'
      )
    self.image_shape = tuple(int(s) for s in image_shape)
    height, width, channels = self.image_shape
    self.max_len = height * width * channels
    init = nnx.initializers.normal(0.02)
    self.row = nnx.Embed(height, dim, dtype=dtype, embedding_init=init, rngs=rngs)
    self.col = nnx.Embed(width, dim, dtype=dtype, embedding_init=init, rngs=rngs)
    self.channel = nnx.Embed(channels, dim, dtype=dtype, embedding_init=init, rngs=rngs)

  def coordinates(self, positions: jax.Array):
    """(row, column, channel) of each flat raster position."""
    _, width, channels = self.image_shape
    return (positions // (width * channels), (positions // channels) % width, positions % channels)

  def __call__(self, positions: jax.Array) -> jax.Array:
    row, col, ch = self.coordinates(positions)
    return self.row(row) + self.col(col) + self.channel(ch)


def build_positions(
  kind: str, *, dim: int, max_len: int, image_shape=None, dtype=jnp.float32, rngs: nnx.Rngs
):
  """The additive position module for `kind`, or None (rotary, none).

  Rotary returns None here because it is applied inside attention; the model
  tells its attention layers to rotate instead.
  """
  if kind not in POSITION_KINDS:
    raise ValueError(f'unknown positions {kind!r}; valid: {POSITION_KINDS}')
  if kind == 'learned':
    return LearnedPositions(max_len, dim, dtype=dtype, rngs=rngs)
  if kind == 'sinusoidal':
    return SinusoidalPositions(dim, dtype=dtype)
  if kind == 'axial':
    if image_shape is None:
      raise ValueError("positions='axial' is only for images: it needs image_shape")
    return AxialPositions(image_shape, dim, dtype=dtype, rngs=rngs)
  return None
