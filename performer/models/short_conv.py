"""A short causal convolution on q, k and v (`model.short_conv = K`; 0 = off).

Why: recall needs a token to know its predecessor (the key before a value). With
attention alone, a model must learn a previous-token head in one layer and an
induction head in the next, a slow phase transition; a depthwise convolution over
the last K positions hands every position its neighbours directly. Recurrent and
linear-attention models (H3, Based, GLA, DeltaNet; Zoology's MQAR baselines) put one
on q, k and v for this reason, with a SiLU after it.

One kernel [K, heads, head_dim] per projection, no bias: y_t = silu(sum_i w_i x_{t-i}),
where x_{t-i} counts only inside the same packed segment and padded positions read as
zeros. Decoding keeps the last K - 1 inputs of each row (`init_history`), so
decode == forward: the history starts as zeros, exactly the forward pass's left edge.
Prefill assumes right-padded rows (a prompt's tokens first, as sampling pads them):
the history after a prefill is the K - 1 inputs ending at each row's last real token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ConvParam(nnx.Param):
  """A short-convolution kernel: trained, and in no pretrained checkpoint (models.NEW_PARAMS)."""


class ShortConv(nnx.Module):
  """Depthwise causal convolution over the length axis of [B, L, H, D] inputs."""

  def __init__(self, size: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
    self.size = size
    bound = 1.0 / size**0.5  # PyTorch Conv1d's default init for a depthwise kernel
    self.kernel = ConvParam(
      jax.random.uniform(rngs.params(), (size, heads, head_dim), jnp.float32, -bound, bound)
    )

  def init_history(self, batch: int, dtype=jnp.float32):
    """The decoding state before any token: K - 1 zero inputs [B, K-1, heads, head_dim]."""
    return jnp.zeros((batch, self.size - 1) + self.kernel.shape[1:], dtype)

  def _mix(self, x, kept):
    """sum_i w_i x[:, t - i] over the last L rows of x [B, P + L, H, D] (P = K - 1 of
    history); kept(i) [B, L] says whether tap i of each output counts."""
    w = self.kernel[...].astype(x.dtype)
    length = x.shape[1] - (self.size - 1)
    out = 0
    for i in range(self.size):
      tap = jax.lax.slice_in_dim(x, self.size - 1 - i, self.size - 1 - i + length, axis=1)
      out = out + jnp.where(kept(i)[..., None, None], tap, 0) * w[i]
    return jax.nn.silu(out)

  def __call__(self, x, *, mask=None, segment_ids=None):
    """The training / evaluation pass: x [B, L, H, D] -> [B, L, H, D]."""
    if mask is not None:
      x = jnp.where(mask[..., None, None], x, 0)
    batch, length = x.shape[:2]
    seg = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids
    pad = self.size - 1
    padded_seg = jnp.pad(seg, ((0, 0), (pad, 0)), constant_values=-1)
    padded = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0)))

    def kept(i):
      return jax.lax.slice_in_dim(padded_seg, pad - i, pad - i + length, axis=1) == seg

    return self._mix(padded, kept)

  def prefill(self, history, x, *, mask=None):
    """Continues from `history` [B, K-1, H, D]: (out [B, L, H, D], new history)."""
    if mask is not None:
      x = jnp.where(mask[..., None, None], x, 0)
    joined = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    out = self._mix(joined, lambda i: jnp.ones(x.shape[:2], bool))
    count = x.shape[1] if mask is None else mask.sum(axis=1)  # real tokens per row
    rows = jnp.broadcast_to(count, x.shape[:1])[:, None] + jnp.arange(self.size - 1)
    new = jnp.take_along_axis(joined, rows[:, :, None, None], axis=1)
    return out, new.astype(history.dtype)

  def step(self, history, x, *, mask=None):
    """One token per row, x [B, H, D]; a row whose `mask` is False keeps its history."""
    out, new = self.prefill(history, x[:, None], mask=None)
    if mask is not None:
      new = jnp.where(mask[:, None, None, None], new, history)
    return out[:, 0], new
