"""The model families, one row each: `build_model(config)` dispatches on
`config.model.family`.

A family row owns everything about it the rest of the package asks: its model
class (which takes the family's config and returns `(outputs, cache)` from one
forward path), the tasks it can learn, the config fields that define it
(`fixed`, applied whatever the config says), defaults for fields the config
leaves at 0, its own config class (a `ModelConfig` subclass when it has settings
of its own, e.g. BERT's token types; configs/base.py takes their keys from here),
its importer module for pretrained checkpoints (`performer.convert.<name>`, with
`read_config`, `load` and `load_tokenizer`; see convert/pretrained.py), the
checkpoint architecture names that importer reads (GGUF `general.architecture`,
HF `model_type`) and so the config fields a checkpoint decides. A new family is
its model file, its importer and one row in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from performer import tasks
from performer.models import bert, llama
from performer.models.config import FIELDS, AttentionSpec, ModelConfig, ModelConfigError
from performer.models.transformer import Transformer

# Architecture fields any checkpoint decides (build.resolve_config writes them into
# config.model); a family adds its own config fields.
CHECKPOINT_FIELDS = (
  'vocab_size', 'num_layers', 'num_heads', 'num_kv_heads', 'emb_dim', 'mlp_dim', 'head_dim',
  'max_len', 'rope_theta', 'norm_eps', 'tie_embeddings',
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Family:
  model: type
  tasks: tuple
  fixed: dict = dataclasses.field(default_factory=dict)
  defaults: dict = dataclasses.field(default_factory=dict)
  importer: str | None = None  # module of the pretrained-checkpoint importer
  architectures: tuple = ()  # checkpoint architecture names the importer reads
  config: type = ModelConfig  # the family's ModelConfig (subclass)

  @property
  def own_fields(self) -> dict:
    """The family's config fields beyond the shared ones, with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(self.config) if f.name not in FIELDS}

  @property
  def pretrained_fields(self) -> tuple:
    """The config.model fields a pretrained checkpoint of this family decides."""
    return CHECKPOINT_FIELDS + tuple(self.own_fields)


FAMILIES = {
  'transformer': Family(Transformer, ('causal_lm', 'mlm', 'image_ar'), {}, {'norm_eps': 1e-6}),
  'llama': Family(llama.Model, ('causal_lm',), llama.FIXED, llama.DEFAULTS, 'performer.convert.llama', ('llama',)),
  'bert': Family(bert.BertEncoder, ('encoder',), bert.FIXED, bert.DEFAULTS, 'performer.convert.bert', ('bert',), bert.BertConfig),
}  # fmt: skip


def family_fields() -> dict:
  """Every family's own config fields with their defaults (configs/base.py's keys)."""
  return {k: v for family in FAMILIES.values() for k, v in family.own_fields.items()}


def family_of_architecture(arch) -> str | None:
  """The family whose importer reads checkpoints of architecture `arch`, or None."""
  return next((name for name, f in FAMILIES.items() if arch in f.architectures), None)


def architectures() -> tuple:
  return tuple(arch for family in FAMILIES.values() for arch in family.architectures)


def _as_dict(cfg) -> dict:
  if hasattr(cfg, 'to_dict'):
    return cfg.to_dict()
  return dict(cfg)


def model_config(cfg) -> ModelConfig:
  """`config.model` (ConfigDict or dict; a ModelConfig passes through) as the family's
  validated config. Zero means "the default" for num_kv_heads, head_dim and norm_eps;
  `image_shape` only counts for image tasks; other families' own fields are ignored.
  Raises ModelConfigError (a ValueError) naming the key."""
  if isinstance(cfg, ModelConfig):
    return cfg
  fields = _as_dict(cfg)
  family_name = fields.pop('family', None) or 'transformer'
  if family_name not in FAMILIES:
    raise ModelConfigError(
      'family', f'unknown value {family_name!r}; choose from {", ".join(FAMILIES)}'
    )
  family = FAMILIES[family_name]
  unknown = sorted(set(fields) - set(FIELDS) - set(family_fields()))
  if unknown:
    raise ValueError(f'unknown model config keys {unknown}')
  others = set(family_fields()) - set(family.own_fields)
  fields = {k: v for k, v in fields.items() if k not in others and v is not None}
  task = fields.get('task') or 'causal_lm'
  if 'task' not in family.fixed and task not in family.tasks:
    raise ModelConfigError(
      'task',
      f'unknown value {task!r} for family {family_name!r}; valid: {", ".join(family.tasks)}',
    )
  fields['attention'] = AttentionSpec.from_config(fields.get('attention'))
  for key, value in family.defaults.items():
    if not fields.get(key):
      fields[key] = value
  image = tasks.TASKS[task].image if task in tasks.TASKS else False
  if image and not fields.get('max_len') and fields.get('image_shape'):
    fields['max_len'] = math.prod(fields['image_shape'])
  if tuple(fields.get('image_shape') or ()) == (0, 0, 0) or not image:
    fields.pop('image_shape', None)
  fields.update(family.fixed)
  return family.config(family=family_name, **fields)


def build_model(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model of `cfg` (config.model, a dict or a ModelConfig), any family."""
  cfg = model_config(cfg)
  return FAMILIES[cfg.family].model(cfg, rngs=rngs)
