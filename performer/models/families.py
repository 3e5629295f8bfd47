"""The model families, one line each: `build_model(config)` dispatches on
`config.model.family`.

A family is a model class that takes a `ModelConfig` and returns
`(outputs, cache)` from one forward path, the config fields that define the
family (`FIXED`, applied whatever the config says), defaults for fields the
config leaves at 0, and the importer module for its pretrained checkpoints
(`performer.convert.<name>`, which provides `keymap`, `read_config` and
`read_tensors`; see convert/pretrained.py). A new family is its model file,
its importer and one line in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from performer.models import bert, llama
from performer.models.config import FIELDS, AttentionSpec, ModelConfig
from performer.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Family:
  model: type
  tasks: tuple
  fixed: dict = dataclasses.field(default_factory=dict)
  defaults: dict = dataclasses.field(default_factory=dict)
  importer: str | None = None  # module of the pretrained-checkpoint importer


FAMILIES = {
  'transformer': Family(Transformer, ('causal_lm', 'mlm', 'image_ar'), {}, {'norm_eps': 1e-6}),
  'llama': Family(llama.Model, ('causal_lm',), llama.FIXED, llama.DEFAULTS, 'performer.convert.llama'),
  'bert': Family(bert.BertEncoder, ('encoder',), bert.FIXED, bert.DEFAULTS, 'performer.convert.bert'),
}  # fmt: skip


def _as_dict(cfg) -> dict:
  if hasattr(cfg, 'to_dict'):
    return cfg.to_dict()
  return dict(cfg)


def model_config(cfg) -> ModelConfig:
  """`config.model` (ConfigDict or dict; a ModelConfig passes through) as a
  validated `ModelConfig`. Zero means "the default" for num_kv_heads, head_dim and
  norm_eps; `image_shape` only counts for image_ar. Raises ValueError naming the key."""
  if isinstance(cfg, ModelConfig):
    return cfg
  fields = _as_dict(cfg)
  family_name = fields.pop('family', None) or 'transformer'
  if family_name not in FAMILIES:
    raise ValueError(f'unknown model family {family_name!r}; valid: {tuple(FAMILIES)}')
  family = FAMILIES[family_name]
  unknown = sorted(set(fields) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown model config keys {unknown}')
  task = fields.get('task') or 'causal_lm'
  if 'task' not in family.fixed and task not in family.tasks:
    raise ValueError(
      f'unknown model task {task!r} for family {family_name!r}; valid: {family.tasks}'
    )
  fields['attention'] = AttentionSpec.from_config(fields.get('attention'))
  fields = {k: v for k, v in fields.items() if v is not None}
  for key, value in family.defaults.items():
    if not fields.get(key):
      fields[key] = value
  if task == 'image_ar' and not fields.get('max_len') and fields.get('image_shape'):
    fields['max_len'] = math.prod(fields['image_shape'])
  if tuple(fields.get('image_shape') or ()) == (0, 0, 0) or task != 'image_ar':
    fields.pop('image_shape', None)
  fields.update(family.fixed)
  return ModelConfig(family=family_name, **fields)


def build_model(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model of `cfg` (config.model, a dict or a ModelConfig), any family."""
  cfg = model_config(cfg)
  return FAMILIES[cfg.family].model(cfg, rngs=rngs)
