"""The layers every family is built from: one attention layer, norms, MLPs, a block.

One parameter set works with every attention kind (a softmax checkpoint loads into
a Performer unchanged), so nothing here branches on the kind: `SelfAttention`
holds the module `attention.build` returns, and every kind-dependent variable
lives inside it, typed by what training does with it (`attention.RandomProjection`,
`attention.FeatureParam`, `attention.FeatureStats`).

Grouped-query attention is the general case (num_kv_heads == num_heads is
ordinary multi-head attention): k and v keep their kv heads all the way into the
attention module, so a softmax KV cache holds kv heads, not repeated query heads.

Forward with an optional cache, as in Flax's examples/gemma: `cache=None` is the
training / evaluation pass; with a cache, a call of one token per row is a decoding
step and a longer call prefills a fresh cache.

Intermediates for analysis and attention transfer are sown only inside
`nnx.capture(...)` (see `sow`), so ordinary calls store nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from performer.models import lora
from performer.models import positions as positions_lib
from performer.models.config import ModelConfig
from performer.models.short_conv import ShortConv


def sow(module: nnx.Module, name: str, value) -> None:
  """`module.sow(nnx.Intermediate, name, value)` when an `nnx.capture` is recording,
  keeping only the latest value; outside a capture nothing is stored (plain sowing
  would keep every call's arrays alive on the module)."""
  if hasattr(module, '__captures__'):  # set by nnx.capture while it runs
    module.sow(nnx.Intermediate, name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (as HF does: bf16
  mean-squares lose the small-eps regime)."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(self.dtype)


def norm(cfg: ModelConfig, *, rngs: nnx.Rngs):
  """The family's norm in the compute dtype (statistics in float32 either way)."""
  if cfg.norm == 'rms':
    return RMSNorm(cfg.emb_dim, cfg.norm_eps, dtype=cfg.compute_dtype)
  return nnx.LayerNorm(cfg.emb_dim, epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, rngs=rngs)


class Mlp(nnx.Module):
  """Feed-forward: down(act(up(x))) with GELU (tanh or exact erf form), or
  down(silu(gate(x)) * up(x)) for SwiGLU."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    def linear(i, o):
      return nnx.Linear(i, o, use_bias=cfg.use_bias, dtype=cfg.compute_dtype, rngs=rngs)

    self.kind = cfg.mlp
    if cfg.mlp == 'swiglu':
      self.gate = linear(cfg.emb_dim, cfg.mlp_dim)
    self.up = linear(cfg.emb_dim, cfg.mlp_dim)
    self.down = linear(cfg.mlp_dim, cfg.emb_dim)

  def __call__(self, x):
    if self.kind == 'swiglu':
      return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
    return self.down(jax.nn.gelu(self.up(x), approximate=self.kind == 'gelu'))


class SelfAttention(nnx.Module):
  """q, k, v, o projections around the config's attention module.

  Projections are `nnx.LinearGeneral` with the head axis explicit, so q comes out as
  [batch, length, heads, head_dim] and k, v as [batch, length, kv_heads, head_dim]
  without reshapes. Rotary positions rotate q and k here, before any feature map
  (with `attention.linear_nope`, the feature map gets them unrotated as
  `linear_qk` while the exact parts of a hybrid score the rotated ones).
  Kernels are float32 parameters; the compute dtype is the config's. With
  `cfg.lora_rank` > 0 the four projections carry LoRA factors (lora.py) beside
  unchanged kernel paths, so checkpoints and importers see the same model.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, hd = cfg.compute_dtype, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.causal = cfg.causal
    self.rope_theta = cfg.rope_theta if cfg.rotary else 0.0

    def project(heads):
      return lora.linear(
        cfg, cfg.emb_dim, (heads, hd), use_bias=cfg.use_bias, dtype=dtype, rngs=rngs
      )

    self.query, self.key, self.value = (
      project(cfg.num_heads),
      project(cfg.num_kv_heads),
      project(cfg.num_kv_heads),
    )
    self.out = lora.linear(
      cfg,
      (cfg.num_heads, hd),
      cfg.emb_dim,
      axis=(-2, -1),
      use_bias=cfg.use_bias,
      dtype=dtype,
      rngs=rngs,
    )
    self.attend = cfg.attention.build(head_dim=hd, num_heads=cfg.num_heads, rngs=rngs)
    heads = (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)
    self.convs = (  # short_conv.py: a causal convolution on q, k and v
      nnx.List([ShortConv(cfg.short_conv, h, hd, rngs=rngs) for h in heads])
      if cfg.short_conv
      else None
    )

  def init_cache(self, batch: int, max_length: int, dtype=jnp.float32):
    """The attention module's empty state: (S, z) per head for feature-map kinds
    (fixed size), a KV cache of `max_length` kv-head slots for softmax; with a short
    convolution, {'attention': that, 'conv': the last K - 1 inputs of q, k, v}."""
    state = self.attend.init_state(
      batch, self.head_dim, num_kv_heads=self.num_kv_heads, max_length=max_length, dtype=dtype
    )
    if self.convs is None:
      return state
    return {'attention': state, 'conv': tuple(c.init_history(batch, dtype) for c in self.convs)}

  def captured_linear_qk(self, captured: dict, path: str):
    """What this layer's feature map sees in a capture (`capture_intermediates`, its
    values keyed '{path}.name') when that is not (q, k): the unrotated pair it sows
    under `attention.linear_nope`; else None."""
    if not self.attend.options.linear_nope:
      return None
    if f'{path}.qk_unrotated' not in captured:
      raise ValueError(
        f'{path} has attention.linear_nope but the capture sowed no unrotated q, k '
        '(its model has no rotary positions)'
      )
    return captured[f'{path}.qk_unrotated']

  def far_query(self, q_unrotated) -> dict:
    """{'far_q': the queries rotated to the clamp distance} for the attention calls
    under ``attention.rope_clamp`` (far sinks and cached keys, rope_clamp.py); else {}."""
    if not (self.rope_theta and self.attend.rope_clamp):
      return {}
    clamped = jnp.full(q_unrotated.shape[:2], self.attend.rope_clamp, jnp.int32)
    return {'far_q': positions_lib.apply_rope(q_unrotated, clamped, base=self.rope_theta)}

  def _convolve(self, qkv, *, mask, segment_ids, cache):
    """(q, k, v) through the short convolutions: (q, k, v, cache with new history)."""
    if cache is None:
      return tuple(c(x, mask=mask, segment_ids=segment_ids) for c, x in zip(self.convs, qkv)), None
    call = 'step' if qkv[0].shape[1] == 1 else 'prefill'
    step_mask = None if mask is None or call == 'prefill' else mask[:, 0]
    outs, history = [], []
    for conv, x, h in zip(self.convs, qkv, cache['conv']):
      if call == 'step':
        y, h = conv.step(h, x[:, 0], mask=step_mask)
        y = y[:, None]
      else:
        y, h = conv.prefill(h, x, mask=mask)
      outs.append(y)
      history.append(h)
    return tuple(outs), {**cache, 'conv': tuple(history)}

  def __call__(self, x, *, positions, mask=None, segment_ids=None, cache=None):
    """x [B, L, D] -> (out [B, L, D], cache). `positions` [B, L] are absolute (RoPE)."""
    q, k, v = self.query(x), self.key(x), self.value(x)
    outer = None
    if self.convs is not None:
      (q, k, v), outer = self._convolve((q, k, v), mask=mask, segment_ids=segment_ids, cache=cache)
      cache = None if cache is None else outer['attention']
    linear_qk, far = None, {}
    if self.rope_theta:
      sow(self, 'qk_unrotated', (q, k))  # for attention transfer into linear_nope
      if self.attend.options.linear_nope:  # the feature map sees them unrotated
        linear_qk = (q, k)
      far = self.far_query(q)
      q = positions_lib.apply_rope(q, positions, base=self.rope_theta)
      k = positions_lib.apply_rope(k, positions, base=self.rope_theta)
    sow(self, 'qkv', (q, k, v))
    if cache is None:
      y = self.attend(
        q,
        k,
        v,
        causal=self.causal,
        mask=mask,
        segment_ids=segment_ids,
        linear_qk=linear_qk,
        **far,
      )
    elif x.shape[1] == 1:
      step_mask = None if mask is None else mask[:, 0]
      step_qk = None if linear_qk is None else (linear_qk[0][:, 0], linear_qk[1][:, 0])
      step_far = {name: x[:, 0] for name, x in far.items()}
      y, cache = self.attend.step(
        cache, q[:, 0], k[:, 0], v[:, 0], mask=step_mask, linear_qk=step_qk, **step_far
      )
      y = y[:, None]
    else:
      y, cache = self.attend.prefill(cache, q, k, v, mask=mask, linear_qk=linear_qk, **far)
    if outer is not None and cache is not None:
      cache = {**outer, 'attention': cache}
    sow(self, 'attended', y)
    return self.out(y), cache


class PreNormBlock(nnx.Module):
  """x + Drop(Attn(Norm(x))), then x + Drop(MLP(Norm(x))).

  Pre-norm keeps the residual stream un-normalised, which trains stably without
  warmup tricks; the model applies one final norm after the last block. Dropout
  is residual dropout only: FAVOR never forms attention probabilities to drop.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = norm(cfg, rngs=rngs)
    self.attn = SelfAttention(cfg, rngs=rngs)
    self.attn_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    self.mlp_norm = norm(cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.mlp_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(
    self, x, *, positions, mask=None, segment_ids=None, cache=None, deterministic=True, rngs=None
  ):
    h, cache = self.attn(
      self.attn_norm(x), positions=positions, mask=mask, segment_ids=segment_ids, cache=cache
    )
    x = x + self.attn_dropout(h, deterministic=deterministic, rngs=rngs)
    h = self.mlp(self.mlp_norm(x))
    return x + self.mlp_dropout(h, deterministic=deterministic, rngs=rngs), cache


def capture_intermediates(model: nnx.Module, *args, **kwargs):
  """`model(*args, **kwargs)` under `nnx.capture`: (outputs, {path: value}) with
  every value sown by `sow` during the call, keyed by dotted module path plus name
  ('hidden', 'layers.0.attn.qkv', 'layers.0.attn.attended', ...)."""
  outputs, state = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
  flat = {'.'.join(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(state)}
  return outputs, {
    k: (v.get_value() if isinstance(v, nnx.Variable) else v) for k, v in flat.items()
  }
