"""Llama-family causal LM (RMSNorm, SwiGLU, RoPE, grouped-query attention)
whose attention kind is a config string.

Imported Llama checkpoints (HF safetensors or llama.cpp GGUF) need pieces
our own pre-LN `Transformer` does not have: RMSNorm without bias, a gated
SiLU MLP, rotary positions with a model-specific base (theta), and fewer
key/value heads than query heads. The attention kernel itself is still the
zoo's `attention.build(kind, ...)` module, so one imported checkpoint
runs as softmax or as any Performer kind. With GQA, k and v are repeated to
the query heads *before* `attend` (HF's `repeat_kv` order: query head h
uses kv head h // (num_heads // num_kv_heads)), so FAVOR works per query head
exactly as in an ordinary multi-head model.

    model = LlamaForCausalLM(LlamaConfig(...), rngs=nnx.Rngs(0))
    logits = model(tokens)          # float32 [B, L, vocab]; logits[t] predict tokens[t+1]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from performer.models import positions as positions_lib
from performer.models import transformer

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a Llama decoder (names follow our model config).

  HF names: hidden_size -> emb_dim, intermediate_size -> mlp_dim,
  num_hidden_layers -> num_layers, num_attention_heads -> num_heads,
  num_key_value_heads -> num_kv_heads, rope_theta, rms_norm_eps,
  max_position_embeddings -> max_len, tie_word_embeddings -> tie_embeddings.
  """

  vocab_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  emb_dim: int
  mlp_dim: int
  head_dim: int | None = None  # None: emb_dim // num_heads
  max_len: int = 2048
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = False
  dtype: str = 'float32'
  attention_kind: str = 'softmax'
  attention_options: tuple = ()  # (name, value) pairs for attention.build
  per_head_features: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}'
      )
    if self.head_dim is None and self.emb_dim % self.num_heads:
      raise ValueError(
        f'emb_dim {self.emb_dim} is not divisible by num_heads '
        f'{self.num_heads}; give head_dim explicitly'
      )
    if self.dims_per_head % 2:
      raise ValueError(f'RoPE needs an even head_dim, got {self.dims_per_head}')
    if self.dtype not in DTYPES:
      raise ValueError(f'unknown dtype {self.dtype!r}; valid: {tuple(DTYPES)}')

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.emb_dim // self.num_heads


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (as HF does:
  bf16 mean-squares lose the small-eps regime)."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(self.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, emb_dim, mlp_dim, *, dtype, rngs):
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)
    self.gate, self.up, self.down = (
      lin(emb_dim, mlp_dim),
      lin(emb_dim, mlp_dim),
      lin(mlp_dim, emb_dim),
    )

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class GQAttention(nnx.Module):
  """Grouped-query attention with RoPE, through a pluggable `attend`."""

  def __init__(self, cfg: LlamaConfig, *, make_attention, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
    self.head_dim = hd = cfg.dims_per_head
    self.rope_theta = cfg.rope_theta

    def proj(heads):
      return nnx.LinearGeneral(cfg.emb_dim, (heads, hd), use_bias=False, dtype=dtype, rngs=rngs)

    self.query, self.key, self.value = (
      proj(cfg.num_heads),
      proj(cfg.num_kv_heads),
      proj(cfg.num_kv_heads),
    )
    self.out = nnx.LinearGeneral(
      (cfg.num_heads, hd), cfg.emb_dim, axis=(-2, -1), use_bias=False, dtype=dtype, rngs=rngs
    )
    self.attend = make_attention(head_dim=hd, num_heads=cfg.num_heads, rngs=rngs)

  def __call__(self, x, *, positions, mask=None, segment_ids=None):
    q, k, v = self.query(x), self.key(x), self.value(x)
    q = positions_lib.apply_rope(q, positions, base=self.rope_theta)
    k = positions_lib.apply_rope(k, positions, base=self.rope_theta)
    groups = self.num_heads // self.num_kv_heads
    if groups > 1:
      k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    y = self.attend(q, k, v, causal=True, mask=mask, segment_ids=segment_ids)
    return self.out(y)


class LlamaBlock(nnx.Module):
  """x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)) (pre-norm)."""

  def __init__(self, cfg: LlamaConfig, *, make_attention, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    self.attn_norm = RMSNorm(cfg.emb_dim, cfg.rms_eps, dtype=dtype)
    self.attn = GQAttention(cfg, make_attention=make_attention, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.emb_dim, cfg.rms_eps, dtype=dtype)
    self.mlp = SwiGLU(cfg.emb_dim, cfg.mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, positions, mask=None, segment_ids=None):
    x = x + self.attn(self.attn_norm(x), positions=positions, mask=mask, segment_ids=segment_ids)
    return x + self.mlp(self.mlp_norm(x))


class LlamaForCausalLM(nnx.Module):
  """Embedding -> N Llama blocks -> RMSNorm -> logits (tied or own head).

  Call: model(tokens, *, mask=None, segment_ids=None, positions=None,
  deterministic=True, rngs=None) -> float32 logits [B, L, vocab_size], the
  same signature and `target_offset = 1` convention as `Transformer`'s
  causal_lm, so losses and evaluation code work unchanged. Llama has no
  dropout; `deterministic`/`rngs` are accepted and ignored.
  """

  task = 'causal_lm'
  causal = True
  target_offset = 1

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.vocab_size = cfg.vocab_size
    self.max_len = cfg.max_len
    dtype = DTYPES[cfg.dtype]
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.emb_dim,
      dtype=dtype,
      embedding_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    make_attention = transformer.attention_factory(cfg)
    self.layers = nnx.List(
      [LlamaBlock(cfg, make_attention=make_attention, rngs=rngs) for _ in range(cfg.num_layers)]
    )
    self.final_norm = RMSNorm(cfg.emb_dim, cfg.rms_eps, dtype=dtype)
    self.head = (
      None
      if cfg.tie_embeddings
      else nnx.Linear(cfg.emb_dim, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)
    )

  def __call__(
    self,
    tokens,
    *,
    mask=None,
    segment_ids=None,
    positions=None,
    deterministic: bool = True,
    rngs=None,
  ):
    del deterministic, rngs
    tokens = jnp.asarray(tokens)
    transformer.check_inputs(
      tokens,
      max_len=self.max_len,
      vocab_size=self.vocab_size,
      mask=mask,
      segment_ids=segment_ids,
      positions=positions,
    )
    batch, length = tokens.shape
    if positions is None:
      positions = (
        positions_lib.default_positions(batch, length)
        if segment_ids is None
        else positions_lib.positions_from_segments(segment_ids)
      )
    if mask is not None:
      mask = jnp.asarray(mask, bool)
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x, positions=positions, mask=mask, segment_ids=segment_ids)
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32)


def greedy_generate(
  model,
  prompt_ids,
  max_new_tokens: int,
  *,
  eos_id: int | None = None,
  max_length: int | None = None,
):
  """Greedy decoding by re-running the full forward pass (no KV cache).

  Simple on purpose: the cached/recurrent decoder lives elsewhere. The
  sequence is padded to one fixed length so the jitted forward compiles
  once; causal attention means the padding after position t cannot change
  logits[t]. Returns the list of new token ids (stops after `eos_id`).
  """
  ids = [int(t) for t in prompt_ids]
  total = max_length or len(ids) + max_new_tokens
  if total > model.max_len or len(ids) + max_new_tokens > total:
    raise ValueError(
      f'prompt {len(ids)} + {max_new_tokens} new tokens do not '
      f'fit in length {total} (model max_len {model.max_len})'
    )
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_token(state, buf, t):
    logits = nnx.merge(graphdef, state)(buf)
    return jnp.argmax(logits[0, t - 1])

  new = []
  for _ in range(max_new_tokens):
    buf = jnp.asarray([ids + [0] * (total - len(ids))], jnp.int32)
    tok = int(next_token(state, buf, len(ids)))
    ids.append(tok)
    new.append(tok)
    if eos_id is not None and tok == eos_id:
      break
  return new
