"""The typed model config every family shares, and the one copy of its checks.

`config.model` (an ml_collections ConfigDict, or a plain dict) becomes a frozen
`ModelConfig` once, here, so modules get plain Python values. These checks are
the only ones of the model settings: `config_utils.validate` runs them on the
config before anything is built, and a failure is a `ModelConfigError` naming
the key under config.model.

A family fixes the parts of the architecture that define it (Llama: RMSNorm,
SwiGLU, rotary positions, no biases; BERT: post-LN with token types) through
its `FIXED` fields in `families.py`; the config supplies the sizes. A family
with settings of its own subclasses `ModelConfig` (bert.BertConfig).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp

from performer import attention, tasks

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
POSITIONS = ('learned', 'sinusoidal', 'rotary', 'axial', 'none')
NORMS = ('layer', 'rms')
MLPS = ('gelu', 'gelu_exact', 'swiglu')


class ModelConfigError(ValueError):
  """A bad model setting; the message starts with its key under config.model."""

  def __init__(self, key, message):
    super().__init__(f'{key}: {message}')
    self.key = key


def choice_error(key, value, choices):
  return ModelConfigError(key, f'unknown value {value!r}; choose from {", ".join(choices)}')


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """The attention kind and its options: the only attention setting a model has."""

  kind: str = 'softmax'
  options: tuple = ()  # (name, value) pairs for attention.build
  per_head_features: bool = False

  @classmethod
  def from_config(cls, att) -> AttentionSpec:
    """From `config.model.attention` (ConfigDict or dict); None values are dropped so
    the library's defaults apply. Validates the options (ValueError)."""
    att = dict(att.items()) if hasattr(att, 'items') else dict(att or {})
    kind = att.pop('kind', 'softmax') or 'softmax'
    per_head = bool(att.pop('per_head_features', False))
    options = tuple(sorted((k, v) for k, v in att.items() if v is not None))
    try:
      attention.make_options(kind, per_head_features=per_head, **dict(options))
    except ValueError as e:
      key = 'attention.kind' if kind not in attention.KINDS else 'attention'
      raise ModelConfigError(key, e) from e
    return cls(kind, options, per_head)

  def build(self, *, head_dim: int, num_heads: int, rngs):
    """The attention module (see `attention.build`)."""
    return attention.build(
      self.kind,
      head_dim=head_dim,
      num_heads=num_heads,
      rngs=rngs,
      per_head_features=self.per_head_features,
      **dict(self.options),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Validated view of `config.model`; fields follow the config keys.

  num_kv_heads: key/value heads (grouped-query attention); num_heads = ordinary MHA.
  head_dim: per-head width; emb_dim // num_heads unless a checkpoint says otherwise.
  rope_theta: the rotary base when positions == 'rotary'.
  norm / mlp / use_bias: fixed by the family (see families.py).
  lora_rank / lora_alpha: LoRA on q, k, v, o (lora.py); rank 0 = off.
  short_conv: a causal depthwise convolution of this width on q, k, v (short_conv.py); 0 = off.
  """

  family: str = 'transformer'
  task: str = 'causal_lm'
  vocab_size: int
  num_layers: int
  num_heads: int
  emb_dim: int
  mlp_dim: int
  max_len: int
  num_kv_heads: int = 0
  head_dim: int = 0
  dropout_rate: float = 0.0
  positions: str = 'learned'
  rope_theta: float = 10000.0
  norm: str = 'layer'
  norm_eps: float = 1e-6
  mlp: str = 'gelu'
  use_bias: bool = True
  embed_init_std: float = 1.0
  tie_embeddings: bool = False
  image_shape: tuple | None = None
  lora_rank: int = 0
  lora_alpha: float = 16.0
  short_conv: int = 0
  dtype: str = 'float32'
  attention: AttentionSpec = AttentionSpec()

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    for key, choices in (
      ('task', tuple(tasks.TASKS)),
      ('positions', POSITIONS),
      ('norm', NORMS),
      ('mlp', MLPS),
      ('dtype', tuple(DTYPES)),
    ):
      if getattr(self, key) not in choices:
        raise choice_error(key, getattr(self, key), choices)
    for key in ('vocab_size', 'num_layers', 'num_heads', 'emb_dim', 'mlp_dim', 'max_len'):
      if not getattr(self, key) or getattr(self, key) < 1:
        raise ModelConfigError(key, f'must be a positive integer, got {getattr(self, key)}')
    for key in ('num_kv_heads', 'head_dim', 'dropout_rate', 'norm_eps'):
      if getattr(self, key) < 0:
        raise ModelConfigError(key, f'must be >= 0, got {getattr(self, key)}')
    if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
      raise ModelConfigError(
        'lora_rank', f'must be an integer >= 0 (0 = off), got {self.lora_rank!r}'
      )
    if not isinstance(self.short_conv, int) or self.short_conv < 0:
      raise ModelConfigError(
        'short_conv', f'must be an integer >= 0 (0 = off), got {self.short_conv!r}'
      )
    if self.lora_rank and not self.lora_alpha > 0:
      raise ModelConfigError('lora_alpha', f'must be > 0, got {self.lora_alpha!r}')
    if not self.head_dim:
      if self.emb_dim % self.num_heads:
        raise ModelConfigError(
          'emb_dim', f'{self.emb_dim} is not divisible by num_heads {self.num_heads}'
        )
      set_('head_dim', self.emb_dim // self.num_heads)
    set_('num_kv_heads', self.num_kv_heads or self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(
        'num_kv_heads', f'num_heads {self.num_heads} is not a multiple of {self.num_kv_heads}'
      )
    if self.positions == 'rotary' and self.head_dim % 2:
      raise ModelConfigError('head_dim', f'rotary positions need it even, got {self.head_dim}')
    if dict(self.attention.options).get('linear_nope') and not self.rotary:
      raise ModelConfigError(
        'attention.linear_nope',
        f'keeps rotary positions out of the feature map; positions are {self.positions!r}',
      )
    if self.task_spec.image:
      shape = tuple(int(s) for s in (self.image_shape or ()))
      if len(shape) != 3 or min(shape) < 1:
        raise ModelConfigError(
          'image_shape', f'{self.task} needs (height, width, channels), got {shape}'
        )
      if self.max_len != math.prod(shape):
        raise ModelConfigError(
          'max_len',
          f'{self.task} max_len ({self.max_len}) must equal the number of sub-pixels '
          f'{shape} -> {math.prod(shape)}',
        )
      set_('image_shape', shape)
    else:
      set_('image_shape', None)
      if self.positions == 'axial':
        raise ModelConfigError(
          'positions', f"'axial' is only valid for task {' or '.join(tasks.names(image=True))!r}"
        )

  @property
  def task_spec(self) -> tasks.Task:
    """The `tasks.Task` of `task`: what the model predicts and how (causal, start token)."""
    return tasks.TASKS[self.task]

  @property
  def causal(self) -> bool:
    return self.task_spec.causal

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def rotary(self) -> bool:
    return self.positions == 'rotary'


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
