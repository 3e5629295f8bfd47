"""One pre-norm Transformer stack: our models and the Llama family, three tasks.

The Llama family is this class with RMSNorm, SwiGLU, rotary positions, no biases
and grouped-query attention (its `FIXED` fields in families.py), so an imported
SmolLM2 trains, evaluates and decodes through exactly the code our own models use.

The three tasks share everything (token embedding, positions, pre-norm blocks,
final norm, output projection) and differ in three switches only, so a
checkpoint's parameters mean the same thing in each and any attention kind:

| task       | attention     | input at position t         | logits[t] predict |
|------------|---------------|-----------------------------|-------------------|
| causal_lm  | causal        | tokens[t]                   | tokens[t+1]       |
| mlm        | bidirectional | tokens[t] (masked upstream) | original tokens[t] |
| image_ar   | causal        | tokens[t-1] (START at t=0)  | tokens[t]         |

The switches are the task's (`performer/tasks.py`: `causal`, `target_offset`,
`start_token`); `target_offset` on the model records the last column (1 or 0),
so a loss can align targets without knowing the task.

Image AR shift: the image is flattened in raster order (row, column,
channel) to H*W*C sub-pixel tokens in [0, 256). The model prepends a START
token (id 256, one extra embedding row that is never a target) and drops the
last sub-pixel, so the input at t is sub-pixel t-1 and every one of the
12,288 sub-pixels, including the first, gets a 256-way prediction -- what
bits-per-dim needs. In packed rows the START token is inserted at every
segment start instead of carrying the previous image's last sub-pixel over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from performer.models import layers
from performer.models import positions as positions_lib
from performer.models.config import ModelConfig


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_inputs(tokens, *, max_len, vocab_size, mask=None, segment_ids=None, positions=None):
  """Shape/dtype checks shared by every model (work under jit), plus id range when
  the tokens are concrete."""
  shape = getattr(tokens, 'shape', None)
  dtype = getattr(tokens, 'dtype', None)
  if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(
      f'tokens must be an int array [batch, length]; got shape {shape} dtype {dtype}'
    )
  if shape[1] > max_len:
    raise ValueError(f'sequence length {shape[1]} exceeds the model max_len {max_len}')
  for name, arr in (('mask', mask), ('segment_ids', segment_ids), ('positions', positions)):
    if arr is not None and tuple(arr.shape) != tuple(shape):
      raise ValueError(f'{name} shape {tuple(arr.shape)} must equal tokens shape {tuple(shape)}')
  if _is_concrete(tokens):
    check_tokens(tokens, vocab_size)


def check_tokens(tokens, vocab_size: int) -> None:
  """Host-side check that every token id is in [0, vocab_size).

  Out-of-range ids cannot raise inside jit (values are traced; jnp.take would
  silently return NaN rows), so check on concrete arrays: the model calls
  this itself when it is run eagerly, and a jitted training or eval loop
  should call it on the numpy batch before the step. Raises ValueError
  naming the first offending id and its (row, position).
  """
  arr = np.asarray(tokens)
  bad = (arr < 0) | (arr >= vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
      f'token id {int(arr[where])} at position {where} is out of range '
      f'[0, {vocab_size}) ({int(bad.sum())} bad ids in total)'
    )


def shift_right(tokens: jax.Array, start_id: int, segment_ids=None) -> jax.Array:
  """Inputs for image AR: START, then tokens[:, :-1]; START at segment starts."""
  shifted = jnp.concatenate([jnp.full_like(tokens[:, :1], start_id), tokens[:, :-1]], axis=1)
  if segment_ids is not None:
    new_seg = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1,
    )
    shifted = jnp.where(new_seg, start_id, shifted)
  return shifted


class Transformer(nnx.Module):
  """Embedding -> positions -> N pre-norm blocks -> final norm -> logits.

  Call: model(tokens, *, mask=None, segment_ids=None, positions=None,
  deterministic=True, rngs=None, cache=None) -> (float32 logits [B, L, vocab], cache).

  Without a cache (training, evaluation) `positions` default to the position
  inside each segment when segment_ids are given (packed rows), else 0..L-1, and
  the returned cache is None. `rngs` (an nnx.Rngs, or a key that becomes its
  'dropout' stream) overrides the stored dropout streams when deterministic=False.

  With a cache (from `init_cache`), `tokens` are the embedding's inputs (see
  `decode_inputs`) at each row's next positions: a fresh cache takes a prompt
  [B, P] (right-padded where mask is False), after which each call takes one
  token per row. Each layer's cache is its attention module's state: (S, z) per
  head for feature-map kinds, whatever the context; a kv-head KV cache for softmax.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.task = cfg.task
    self.vocab_size = cfg.vocab_size
    self.max_len = cfg.max_len
    self.causal = cfg.causal
    task = cfg.task_spec
    self.target_offset = task.target_offset
    self.start_id = cfg.vocab_size if task.start_token else None  # one extra embedding row
    self.dtype = dtype = cfg.compute_dtype
    self.embed = nnx.Embed(
      cfg.vocab_size + int(task.start_token),
      cfg.emb_dim,
      dtype=dtype,
      embedding_init=nnx.initializers.normal(cfg.embed_init_std),
      rngs=rngs,
    )
    self.pos_embed = positions_lib.build_positions(
      cfg.positions,
      dim=cfg.emb_dim,
      max_len=cfg.max_len,
      image_shape=cfg.image_shape,
      dtype=dtype,
      rngs=rngs,
    )
    self.embed_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    self.layers = nnx.List([layers.PreNormBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.norm(cfg, rngs=rngs)
    self.head = (
      None
      if cfg.tie_embeddings
      else nnx.Linear(cfg.emb_dim, cfg.vocab_size, use_bias=cfg.use_bias, dtype=dtype, rngs=rngs)
    )

  def __call__(
    self,
    tokens,
    *,
    mask=None,
    segment_ids=None,
    positions=None,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
    cache=None,
  ):
    tokens = jnp.asarray(tokens)
    if mask is not None:
      mask = jnp.asarray(mask, dtype=bool)
    if cache is None:
      check_inputs(
        tokens,
        max_len=self.max_len,
        vocab_size=self.vocab_size,
        mask=mask,
        segment_ids=segment_ids,
        positions=positions,
      )
      inputs, positions = self._training_inputs(tokens, segment_ids, positions)
    else:
      self._check_decode_inputs(tokens, segment_ids)
      inputs = tokens
      positions = cache['positions'][:, None] + jnp.arange(tokens.shape[1])[None]
    if isinstance(rngs, jax.Array):
      # One raw key shared by every Dropout would repeat the same mask in each
      # layer; a stream draws a fresh key per call.
      rngs = nnx.Rngs(dropout=rngs)
    x = self.embed(inputs)
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions).astype(x.dtype)
    x = self.embed_dropout(x, deterministic=deterministic, rngs=rngs)
    layer_caches = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(
        x,
        positions=positions,
        mask=mask,
        segment_ids=segment_ids,
        cache=None if cache is None else cache['layers'][i],
        deterministic=deterministic,
        rngs=rngs,
      )
      layer_caches.append(layer_cache)
    hidden = self.final_norm(x)
    layers.sow(self, 'hidden', hidden)
    if self.head is None:
      logits = self.embed.attend(hidden)[..., : self.vocab_size]
    else:
      logits = self.head(hidden)
    if cache is not None:
      steps = tokens.shape[1] if mask is None else jnp.sum(mask, axis=1, dtype=jnp.int32)
      cache = {'layers': layer_caches, 'positions': cache['positions'] + steps}
    return logits.astype(jnp.float32), cache

  def _training_inputs(self, tokens, segment_ids, positions):
    """Embedding inputs (START-shifted for image_ar) and their positions."""
    batch, length = tokens.shape
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids)
    if positions is None:
      positions = (
        positions_lib.default_positions(batch, length)
        if segment_ids is None
        else positions_lib.positions_from_segments(segment_ids)
      )
    inputs = tokens
    if self.start_id is not None:
      inputs = shift_right(tokens, self.start_id, segment_ids)
    return inputs, jnp.asarray(positions)

  def _check_decode_inputs(self, inputs, segment_ids):
    if not self.causal:
      raise ValueError(f'decoding needs a causal model; task {self.task!r} is bidirectional')
    if segment_ids is not None:
      raise ValueError('decoding takes one sequence per row: segment_ids must be None')
    if inputs.ndim != 2 or inputs.shape[1] > self.max_len:
      raise ValueError(
        f'decoding inputs must be [batch, length <= max_len {self.max_len}], got {inputs.shape}'
      )
    if _is_concrete(inputs):
      check_tokens(inputs, self.embed.num_embeddings)

  # --- Decoding ----------------------------------------------------------------
  # Decoding works on *inputs*, the ids the embedding sees: for image_ar that is
  # START followed by the sub-pixels, so the logits at the last input predict the
  # next token for every task. The cache's `positions` [B] is each row's next
  # absolute position, so rows whose prompts differ in length decode side by side
  # (see performer/sampling.py).

  def decode_inputs(self, tokens):
    """Inputs that make logits[:, n] predict token n: START-prefixed for image_ar
    (one column longer), the tokens themselves for causal_lm."""
    tokens = jnp.asarray(tokens)
    if self.start_id is None:
      return tokens
    start = jnp.full((tokens.shape[0], 1), self.start_id, tokens.dtype)
    return jnp.concatenate([start, tokens], axis=1)

  def init_cache(self, batch: int, max_length: int):
    """Empty decoding cache; `max_length` bounds prompt length + steps (KV caches)."""
    if not self.causal:
      raise ValueError(f'decoding needs a causal model; task {self.task!r} is bidirectional')
    return {
      'layers': [layer.attn.init_cache(batch, max_length, self.dtype) for layer in self.layers],
      'positions': jnp.zeros((batch,), jnp.int32),
    }
