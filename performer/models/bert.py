"""The BERT family: a post-LN encoder (e.g. all-MiniLM-L6-v2) of any attention kind.

HF `BertModel` checkpoints need the original post-LayerNorm block,
x = LN(x + Attn(x)); x = LN(x + FFN(x)), which computes something else than our
pre-norm block with the same weights, plus token-type embeddings and a LayerNorm
on the embeddings. Attention is the shared `layers.SelfAttention` (biases on,
bidirectional, no rotary), so a BERT checkpoint loads into any kind from
`attention.KINDS`; only the random features differ. Its task is 'encoder': the
output is the final hidden states, trained by hidden-state distillation.

    model = models.build_model({'family': 'bert', ...}, rngs=nnx.Rngs(0))
    hidden, _ = model(tokens, mask=mask)                # [B, L, emb_dim] float32
    emb = sentence_embedding(hidden, mask)              # mean pool + L2 norm
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from performer.models import layers, transformer
from performer.models.config import ModelConfig

# What makes a model a BERT, whatever the config says; sizes come from the config.
FIXED = dict(
  task='encoder', norm='layer', mlp='gelu_exact', use_bias=True, positions='learned',
  embed_init_std=0.02,
)  # fmt: skip
DEFAULTS = dict(norm_eps=1e-12)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig(ModelConfig):
  """BERT's own settings on top of the shared ones (config keys of the same names).

  type_vocab_size: rows of the token-type (segment A/B) embedding.
  pooler: build HF's tanh(dense([CLS])) head (`pooled`); unused by the loss.
  """

  type_vocab_size: int = 2
  pooler: bool = False


class PostNormBlock(nnx.Module):
  """x = LN(x + Drop(Attn(x))); x = LN(x + Drop(MLP(x))): the original
  Transformer/BERT order, needed to reproduce post-LN checkpoints."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn = layers.SelfAttention(cfg, rngs=rngs)
    self.attn_norm = layers.norm(cfg, rngs=rngs)
    self.mlp = layers.Mlp(cfg, rngs=rngs)
    self.mlp_norm = layers.norm(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, x, *, positions, mask=None, segment_ids=None, deterministic=True, rngs=None):
    h, _ = self.attn(x, positions=positions, mask=mask, segment_ids=segment_ids)
    x = self.attn_norm(x + self.dropout(h, deterministic=deterministic, rngs=rngs))
    h = self.mlp(x)
    return self.mlp_norm(x + self.dropout(h, deterministic=deterministic, rngs=rngs))


class BertEncoder(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, N post-LN blocks.

  Call: model(tokens, *, mask=None, token_type_ids=None, positions=None,
  segment_ids=None, deterministic=True, rngs=None, cache=None) -> (float32 hidden
  states [B, L, emb_dim], None): the families' one signature; an encoder has no
  decoding cache. `mask` is [B, L] bool (True = real token). Hidden states at
  padded positions are not meaningful; pool with `mean_pool`, which ignores them.
  """

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.task, self.causal = cfg.task, cfg.causal
    self.target_offset = cfg.task_spec.target_offset
    self.vocab_size = cfg.vocab_size
    self.max_len = cfg.max_len
    dtype = cfg.compute_dtype
    init = nnx.initializers.normal(cfg.embed_init_std)

    def embed(n):
      return nnx.Embed(n, cfg.emb_dim, dtype=dtype, embedding_init=init, rngs=rngs)

    self.word_embed = embed(cfg.vocab_size)
    self.pos_embed = embed(cfg.max_len)
    self.type_embed = embed(cfg.type_vocab_size)
    self.embed_norm = layers.norm(cfg, rngs=rngs)
    self.embed_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    self.layers = nnx.List([PostNormBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
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
    cache=None,
  ):
    if cache is not None:
      raise ValueError('a BERT encoder is bidirectional: it has no decoding cache')
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
      x = layer(
        x,
        positions=positions,
        mask=mask,
        segment_ids=segment_ids,
        deterministic=deterministic,
        rngs=rngs,
      )
    layers.sow(self, 'hidden', x)
    return x.astype(jnp.float32), None

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
