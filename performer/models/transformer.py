"""One Transformer stack, three tasks: causal LM, masked LM, image AR.

The three heads share everything (token embedding, positions, pre-LN blocks,
final LayerNorm, output projection) and differ in three switches only, so a
checkpoint's parameters mean the same thing in each and any attention kind:

| task       | attention     | input at position t         | logits[t] predict |
|------------|---------------|-----------------------------|-------------------|
| causal_lm  | causal        | tokens[t]                   | tokens[t+1]       |
| mlm        | bidirectional | tokens[t] (masked upstream) | original tokens[t] |
| image_ar   | causal        | tokens[t-1] (START at t=0)  | tokens[t]         |

`target_offset` on the model records the last column (1 or 0), so a loss
can align targets without knowing the task.

Image AR shift: the image is flattened in raster order (row, column,
channel) to H*W*C sub-pixel tokens in [0, 256). The model prepends a START
token (id 256, one extra embedding row that is never a target) and drops the
last sub-pixel, so the input at t is sub-pixel t-1 and every one of the
12,288 sub-pixels, including the first, gets a 256-way prediction -- what
bits-per-dim needs. In packed rows the START token is inserted at every
segment start instead of carrying the previous image's last sub-pixel over.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from performer import attention
from performer.models import blocks
from performer.models import positions as positions_lib

TASKS = ('causal_lm', 'mlm', 'image_ar')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Validated, typed view of the `config.model` ConfigDict.

  Parsing once here means the modules get plain Python values and bad
  configs fail at build time with a message naming the key.
  """

  task: str
  vocab_size: int
  num_layers: int
  num_heads: int
  emb_dim: int
  mlp_dim: int
  max_len: int
  dropout_rate: float = 0.0
  positions: str = 'learned'
  dtype: str = 'float32'
  image_shape: tuple | None = None
  attention_kind: str = 'softmax'
  attention_options: tuple = ()  # (name, value) pairs for attention.build
  per_head_features: bool = False
  tie_embeddings: bool = False

  @property
  def causal(self) -> bool:
    return self.task != 'mlm'

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


def _get(cfg, key, default=None):
  """Read a key from a ConfigDict or dict; missing or None -> default."""
  try:
    value = cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def spec_from_config(cfg) -> ModelSpec:
  """Build a ModelSpec from `config.model` (ConfigDict or dict).

  Reads: task, vocab_size, num_layers, num_heads, emb_dim, mlp_dim,
  dropout_rate, max_len, positions, dtype, image_shape, attention.{kind,
  num_features, chunk_size, orthogonal, feature_norms, per_head_features},
  and the optional tie_embeddings (default False). Every attention key except
  kind and per_head_features is passed to get_attention; None values are
  dropped so the library's defaults apply.
  """
  task = _get(cfg, 'task')
  if task not in TASKS:
    raise ValueError(f'unknown model task {task!r}; valid tasks: {TASKS}')
  required = ('vocab_size', 'num_layers', 'num_heads', 'emb_dim', 'mlp_dim')
  missing = [k for k in required if _get(cfg, k) is None]
  if missing:
    raise ValueError(f'model config is missing {missing}')
  dtype = _get(cfg, 'dtype', 'float32')
  if dtype not in DTYPES:
    raise ValueError(f'unknown model dtype {dtype!r}; valid: {tuple(DTYPES)}')
  pos = _get(cfg, 'positions', 'learned')
  if pos not in positions_lib.POSITION_KINDS:
    raise ValueError(f'unknown positions {pos!r}; valid: {positions_lib.POSITION_KINDS}')
  image_shape = _get(cfg, 'image_shape')
  max_len = _get(cfg, 'max_len')
  if task == 'image_ar':
    if image_shape is None or len(tuple(image_shape)) != 3:
      raise ValueError(f'image_ar needs image_shape (height, width, channels), got {image_shape}')
    image_shape = tuple(int(s) for s in image_shape)
    n = math.prod(image_shape)
    if max_len is None:
      max_len = n
    elif max_len != n:
      raise ValueError(
        f'image_ar max_len ({max_len}) must equal the number of sub-pixels {image_shape} -> {n}'
      )
  else:
    image_shape = None
    if pos == 'axial':
      raise ValueError("positions='axial' is only valid for task 'image_ar'")
  if max_len is None:
    raise ValueError('model config is missing max_len')
  emb_dim, num_heads = int(cfg['emb_dim']), int(cfg['num_heads'])
  if emb_dim % num_heads:
    raise ValueError(f'emb_dim {emb_dim} is not divisible by num_heads {num_heads}')
  if pos == 'rotary' and (emb_dim // num_heads) % 2:
    raise ValueError(f'rotary positions need an even head_dim, got {emb_dim // num_heads}')

  att = _get(cfg, 'attention', {})
  att = dict(att.items()) if hasattr(att, 'items') else {}
  kind = att.pop('kind', 'softmax') or 'softmax'
  per_head = bool(att.pop('per_head_features', False))
  options = tuple(sorted((k, v) for k, v in att.items() if v is not None))
  attention.make_options(kind, per_head_features=per_head, **dict(options))  # fail early
  return ModelSpec(
    task=task,
    vocab_size=int(cfg['vocab_size']),
    num_layers=int(cfg['num_layers']),
    num_heads=num_heads,
    emb_dim=emb_dim,
    mlp_dim=int(cfg['mlp_dim']),
    max_len=int(max_len),
    dropout_rate=float(_get(cfg, 'dropout_rate', 0.0)),
    positions=pos,
    dtype=dtype,
    image_shape=image_shape,
    attention_kind=kind,
    attention_options=options,
    per_head_features=per_head,
    tie_embeddings=bool(_get(cfg, 'tie_embeddings', False)),
  )


def attention_factory(spec):
  """`make_attention(head_dim=, num_heads=, rngs=)` for a model config with
  `attention_kind`, `attention_options` and `per_head_features`; `attention.build`
  checks the options when the first layer is built."""
  options = dict(spec.attention_options, per_head_features=spec.per_head_features)
  return functools.partial(attention.build, spec.attention_kind, **options)


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
  """Embedding -> positions -> N pre-LN blocks -> LayerNorm -> logits.

  Call: model(tokens, *, mask=None, segment_ids=None, positions=None,
  deterministic=True, rngs=None) -> float32 logits [B, L, vocab_size].
  `positions` default to the position inside each segment when segment_ids
  are given (packed rows), else 0..L-1. `rngs` (an nnx.Rngs, or a key that
  becomes its 'dropout' stream) optionally overrides the dropout streams
  stored at construction; it is only used when deterministic=False. Under
  jit, `deterministic` must be static.
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.task = spec.task
    self.vocab_size = spec.vocab_size
    self.max_len = spec.max_len
    self.causal = spec.causal
    self.target_offset = 1 if spec.task == 'causal_lm' else 0
    self.start_id = spec.vocab_size if spec.task == 'image_ar' else None
    dtype = spec.compute_dtype
    self.dtype = dtype
    num_embeddings = spec.vocab_size + (1 if spec.task == 'image_ar' else 0)
    self.embed = nnx.Embed(
      num_embeddings,
      spec.emb_dim,
      dtype=dtype,
      embedding_init=nnx.initializers.normal(1.0),
      rngs=rngs,
    )
    self.pos_embed = positions_lib.build_positions(
      spec.positions,
      dim=spec.emb_dim,
      max_len=spec.max_len,
      image_shape=spec.image_shape,
      dtype=dtype,
      rngs=rngs,
    )
    self.rotary = spec.positions == 'rotary'
    self.embed_dropout = nnx.Dropout(spec.dropout_rate, rngs=rngs)
    make_attention = attention_factory(spec)
    layers = []
    for _ in range(spec.num_layers):
      layers.append(
        blocks.TransformerBlock(
          spec.emb_dim,
          spec.num_heads,
          spec.mlp_dim,
          make_attention=make_attention,
          causal=spec.causal,
          rotary=self.rotary,
          dropout_rate=spec.dropout_rate,
          dtype=dtype,
          rngs=rngs,
        )
      )
    self.layers = nnx.List(layers)
    self.final_norm = blocks.layer_norm(spec.emb_dim, dtype=dtype, rngs=rngs)
    if spec.tie_embeddings:
      self.head = None
    else:
      self.head = nnx.Linear(spec.emb_dim, spec.vocab_size, dtype=dtype, rngs=rngs)

  def check_inputs(self, tokens, mask=None, segment_ids=None, positions=None):
    check_inputs(
      tokens,
      max_len=self.max_len,
      vocab_size=self.vocab_size,
      mask=mask,
      segment_ids=segment_ids,
      positions=positions,
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
  ):
    return self.logits_from_hidden(
      self.hidden_states(
        tokens,
        mask=mask,
        segment_ids=segment_ids,
        positions=positions,
        deterministic=deterministic,
        rngs=rngs,
      )
    )

  def hidden_states(
    self,
    tokens,
    *,
    mask=None,
    segment_ids=None,
    positions=None,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ):
    """The final (normalized) hidden states [B, L, emb_dim] that the output
    head reads; same arguments as the call. Public so that hidden-state
    distillation and probes need no second forward pass:
    model(t) == model.logits_from_hidden(model.hidden_states(t))."""
    self.check_inputs(tokens, mask, segment_ids, positions)
    tokens = jnp.asarray(tokens)
    batch, length = tokens.shape
    if mask is not None:
      mask = jnp.asarray(mask, dtype=bool)
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids)
    if positions is None:
      positions = (
        positions_lib.default_positions(batch, length)
        if segment_ids is None
        else positions_lib.positions_from_segments(segment_ids)
      )
    positions = jnp.asarray(positions)
    if isinstance(rngs, jax.Array):
      # One raw key shared by every Dropout would repeat the same mask in
      # each layer; a stream draws a fresh key per call.
      rngs = nnx.Rngs(dropout=rngs)

    inputs = tokens
    if self.start_id is not None:
      inputs = shift_right(tokens, self.start_id, segment_ids)
    x = self._embed(inputs, positions)
    x = self.embed_dropout(x, deterministic=deterministic, rngs=rngs)
    rope_positions = positions if self.rotary else None
    for layer in self.layers:
      x = layer(
        x,
        mask=mask,
        segment_ids=segment_ids,
        positions=rope_positions,
        deterministic=deterministic,
        rngs=rngs,
      )
    return self.final_norm(x)

  def _embed(self, inputs, positions):
    """Token embedding plus additive positions (any leading shape)."""
    x = self.embed(inputs)
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions).astype(x.dtype)
    return x

  def _logits(self, x):
    return self.logits_from_hidden(self.final_norm(x))

  def logits_from_hidden(self, hidden):
    """float32 logits [..., vocab_size] from `hidden_states` (already normalized)."""
    if self.head is None:
      logits = self.embed.attend(hidden)[..., : self.vocab_size]
    else:
      logits = self.head(hidden)
    return logits.astype(jnp.float32)

  # --- Recurrent decoding ----------------------------------------------------
  # These work on *inputs*, the ids the embedding sees: for image_ar that is
  # START followed by the sub-pixels (see `decode_inputs`), so the logits at
  # the last input predict the next token for every task. Each layer's cache
  # is the attend object's state: (S, z) per head for the FAVOR kinds (fixed
  # size, whatever the context), a KV cache for softmax. `positions` [B] is
  # the absolute position of each row's next input, so rows whose prompts
  # differ in length decode side by side (see performer/sampling.py).

  def decode_inputs(self, tokens):
    """Inputs that make logits[:, n] predict token n: START-prefixed for
    image_ar (one column longer), the tokens themselves for causal_lm."""
    tokens = jnp.asarray(tokens)
    if self.start_id is None:
      return tokens
    start = jnp.full((tokens.shape[0], 1), self.start_id, tokens.dtype)
    return jnp.concatenate([start, tokens], axis=1)

  def init_cache(self, batch: int, max_length: int):
    """Empty decoding cache; `max_length` bounds prefill length + steps."""
    if not self.causal:
      raise ValueError(f'decoding needs a causal model; task {self.task!r} is bidirectional')
    return {
      'layers': [layer.attn.init_cache(batch, max_length, self.dtype) for layer in self.layers],
      'positions': jnp.zeros((batch,), jnp.int32),
    }

  def prefill(self, inputs, cache, *, mask=None):
    """Causal pass over inputs [B, L] (right-padded where mask is False).

    Returns (logits [B, L, V], cache): logits equal the full forward pass on
    the same inputs, and each row's next position is its number of real
    inputs. `cache` must come fresh from `init_cache`.
    """
    inputs = jnp.asarray(inputs)
    batch, length = inputs.shape
    if length > self.max_len:
      raise ValueError(f'prompt length {length} exceeds the model max_len {self.max_len}')
    if _is_concrete(inputs):
      check_tokens(inputs, self.embed.num_embeddings)
    positions = positions_lib.default_positions(batch, length)
    if mask is not None:
      mask = jnp.asarray(mask, dtype=bool)
    x = self._embed(inputs, positions)
    rope_positions = positions if self.rotary else None
    layer_caches = []
    for layer, layer_cache in zip(self.layers, cache['layers']):
      x, layer_cache = layer.prefill(x, layer_cache, mask=mask, positions=rope_positions)
      layer_caches.append(layer_cache)
    if mask is None:
      next_positions = jnp.full((batch,), length, jnp.int32)
    else:
      next_positions = jnp.sum(mask, axis=1, dtype=jnp.int32)
    return self._logits(x), {'layers': layer_caches, 'positions': next_positions}

  def decode_step(self, inputs_t, cache):
    """One input per row, inputs_t [B], at each row's next position.

    Returns (logits [B, V] for the token after inputs_t, cache).
    """
    positions = cache['positions']
    x = self._embed(jnp.asarray(inputs_t), positions)
    rope_positions = positions if self.rotary else None
    layer_caches = []
    for layer, layer_cache in zip(self.layers, cache['layers']):
      x, layer_cache = layer.decode_step(x, layer_cache, positions=rope_positions)
      layer_caches.append(layer_cache)
    return self._logits(x), {'layers': layer_caches, 'positions': positions + 1}
