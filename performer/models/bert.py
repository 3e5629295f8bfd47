"""BERT-style encoder (post-LN) whose attention kind is a config string.

Imported BERT checkpoints (HF `BertModel`, e.g. all-MiniLM-L6-v2) need the
original post-LayerNorm block: x = LN(x + Attn(x)); x = LN(x + FFN(x)). Our
own `blocks.TransformerBlock` is pre-LN, which computes something else with
the same weights, so this module adds the post-LN block instead of bending
that one. Attention is the shared `blocks.MultiHeadAttention` (biases on,
bidirectional, no rotary), so a BERT checkpoint loads into any kind from
`attention.KINDS`; only the random features differ.

    model = BertEncoder(BertConfig(...), rngs=nnx.Rngs(0))
    hidden = model(tokens, mask=mask)                  # [B, L, emb_dim] float32
    emb = sentence_embedding(hidden, mask)              # mean pool + L2 norm
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from performer.models import blocks, transformer

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyperparameters of a BERT encoder (names follow our model config).

  HF names: vocab_size, hidden_size -> emb_dim, num_hidden_layers ->
  num_layers, num_attention_heads -> num_heads, intermediate_size -> mlp_dim,
  max_position_embeddings -> max_len, type_vocab_size, layer_norm_eps.
  """

  vocab_size: int
  num_layers: int
  num_heads: int
  emb_dim: int
  mlp_dim: int
  max_len: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pooler: bool = True  # HF BertModel's tanh(dense([CLS]))
  dropout_rate: float = 0.0
  dtype: str = 'float32'
  attention_kind: str = 'softmax'
  attention_options: tuple = ()  # (name, value) pairs for attention.build
  per_head_features: bool = False

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'BertConfig':
    """From an HF `config.json` dict; rejects what this encoder cannot do."""
    act = hf.get('hidden_act', 'gelu')
    if act != 'gelu':
      raise ValueError(f'hidden_act {act!r} is not supported (only exact "gelu")')
    pos = hf.get('position_embedding_type', 'absolute')
    if pos != 'absolute':
      raise ValueError(f'position_embedding_type {pos!r} is not supported')
    kw = dict(
      vocab_size=hf['vocab_size'],
      num_layers=hf['num_hidden_layers'],
      num_heads=hf['num_attention_heads'],
      emb_dim=hf['hidden_size'],
      mlp_dim=hf['intermediate_size'],
      max_len=hf.get('max_position_embeddings', 512),
      type_vocab_size=hf.get('type_vocab_size', 2),
      layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
    )
    kw.update(overrides)
    return cls(**kw)


class BertMlp(nnx.Module):
  """Linear -> exact (erf) GELU -> Linear: HF's "gelu", not the tanh one."""

  def __init__(self, emb_dim, mlp_dim, *, dtype, rngs):
    self.up = nnx.Linear(emb_dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(mlp_dim, emb_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x), approximate=False))


class PostLNBlock(nnx.Module):
  """x = LN(x + Drop(Attn(x))); x = LN(x + Drop(MLP(x))) -- the original
  Transformer/BERT order, needed to reproduce post-LN checkpoints."""

  def __init__(self, cfg: BertConfig, *, make_attention, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    self.attn = blocks.MultiHeadAttention(
      cfg.emb_dim,
      cfg.num_heads,
      make_attention=make_attention,
      causal=False,
      use_bias=True,
      dtype=dtype,
      rngs=rngs,
    )
    self.attn_norm = nnx.LayerNorm(cfg.emb_dim, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = BertMlp(cfg.emb_dim, cfg.mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(cfg.emb_dim, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, x, *, mask=None, segment_ids=None, deterministic=True, rngs=None):
    h = self.attn(x, mask=mask, segment_ids=segment_ids)
    x = self.attn_norm(x + self.dropout(h, deterministic=deterministic, rngs=rngs))
    h = self.mlp(x)
    return self.mlp_norm(x + self.dropout(h, deterministic=deterministic, rngs=rngs))


class BertEncoder(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, N post-LN blocks.

  Call: model(tokens, *, mask=None, token_type_ids=None, positions=None,
  segment_ids=None, deterministic=True, rngs=None) -> float32 hidden states
  [B, L, emb_dim]. `mask` is [B, L] bool (True = real token). Hidden states
  at padded positions are not meaningful (attention zeroes padded queries);
  pool with `mean_pool`, which ignores them.
  """

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.vocab_size = cfg.vocab_size
    self.max_len = cfg.max_len
    self.causal = False
    dtype = DTYPES[cfg.dtype]
    init = nnx.initializers.normal(0.02)
    self.word_embed = nnx.Embed(
      cfg.vocab_size, cfg.emb_dim, dtype=dtype, embedding_init=init, rngs=rngs
    )
    self.pos_embed = nnx.Embed(
      cfg.max_len, cfg.emb_dim, dtype=dtype, embedding_init=init, rngs=rngs
    )
    self.type_embed = nnx.Embed(
      cfg.type_vocab_size, cfg.emb_dim, dtype=dtype, embedding_init=init, rngs=rngs
    )
    self.embed_norm = nnx.LayerNorm(cfg.emb_dim, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.embed_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    make_attention = transformer.attention_factory(cfg)
    self.layers = nnx.List(
      [PostLNBlock(cfg, make_attention=make_attention, rngs=rngs) for _ in range(cfg.num_layers)]
    )
    self.pooler = (
      nnx.Linear(cfg.emb_dim, cfg.emb_dim, dtype=dtype, rngs=rngs) if cfg.pooler else None
    )

  def __call__(
    self,
    tokens,
    *,
    mask=None,
    token_type_ids=None,
    positions=None,
    segment_ids=None,
    deterministic=True,
    rngs=None,
  ):
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
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(tokens)
    if mask is not None:
      mask = jnp.asarray(mask, bool)
    if isinstance(rngs, jax.Array):
      rngs = nnx.Rngs(dropout=rngs)
    x = self.word_embed(tokens) + self.pos_embed(positions) + self.type_embed(token_type_ids)
    x = self.embed_dropout(self.embed_norm(x), deterministic=deterministic, rngs=rngs)
    for layer in self.layers:
      x = layer(x, mask=mask, segment_ids=segment_ids, deterministic=deterministic, rngs=rngs)
    return x.astype(jnp.float32)

  def pooled(self, hidden):
    """HF `pooler_output`: tanh(dense(hidden[:, 0])) -- the [CLS] vector."""
    if self.pooler is None:
      raise ValueError('this encoder was built with pooler=False')
    return jnp.tanh(self.pooler(hidden[:, 0])).astype(jnp.float32)


def mean_pool(hidden, mask=None):
  """Average of the hidden states over real tokens (sentence-transformers'
  mean pooling); padded positions get zero weight."""
  if mask is None:
    return hidden.mean(axis=1)
  w = jnp.asarray(mask, hidden.dtype)[..., None]
  return (hidden * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-9)


def sentence_embedding(hidden, mask=None):
  """Mean pooling then L2 normalisation, as all-MiniLM-L6-v2's
  Pooling + Normalize modules do: cosine similarity becomes a dot product."""
  pooled = mean_pool(hidden, mask)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)
