"""Pretrained checkpoints named in a config: 'gguf:PATH' or 'hf:DIR'.

    --config.train.init_from=gguf:/models/SmolLM2-135M-Instruct.Q4_1.gguf
    --config.train.init_from=hf:/models/all-MiniLM-L6-v2      (config.json + safetensors)

`open_pretrained` reads only metadata: which family the checkpoint is (GGUF
`general.architecture`, HF `model_type`) and its architecture fields, which
`build.resolve_config` writes into `config.model` so the run's config.json
describes the model exactly (eval.py, sample.py and resuming need nothing else).
`load_pretrained` then writes the weights into a model of any attention kind
through the family importer's explicit key map; feature-map parameters and LoRA
factors are reported as expected-missing, as for zoo checkpoints. The importer of
family F is `performer.convert.F` with `read_config(fmt, path)`, `load(model, fmt,
path)` and `load_tokenizer(fmt, path)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

from performer import models
from performer.errors import WeightsFileError

FORMATS = ('gguf', 'hf')


def is_pretrained(source: str) -> bool:
  return isinstance(source, str) and source.split(':', 1)[0] in FORMATS and ':' in source


@dataclasses.dataclass(frozen=True)
class Pretrained:
  source: str
  fmt: str
  path: str
  family: str
  fields: dict  # architecture fields for config.model

  @property
  def importer(self):
    return importlib.import_module(models.FAMILIES[self.family].importer)


def _architecture(fmt, path):
  from performer.convert import files  # pylint: disable=g-import-not-at-top

  if fmt == 'gguf':
    field = files.open_gguf(path).fields.get('general.architecture')
    return None if field is None else field.contents()
  if not os.path.isdir(path):
    raise WeightsFileError(f'hf:{path}: expected a directory with config.json and safetensors')
  return files.read_json(os.path.join(path, 'config.json'), 'HF config').get('model_type')


def open_pretrained(source: str) -> Pretrained:
  """The checkpoint `source` names ('gguf:PATH' | 'hf:DIR'), metadata only.

  Raises WeightsFileError (one line, naming the file) for a missing or wrong file
  and an architecture no family imports.
  """
  fmt, _, path = source.partition(':')
  if fmt not in FORMATS or not path:
    raise WeightsFileError(f'{source!r}: expected gguf:PATH or hf:DIR')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise WeightsFileError(f'{source}: no such file or directory')
  arch = _architecture(fmt, path)
  family = models.family_of_architecture(arch)  # GGUF general.architecture / HF model_type
  if family is None:
    raise WeightsFileError(
      f'{source}: architecture {arch!r} has no importer; supported: '
      f'{", ".join(models.architectures())}'
    )
  importer = importlib.import_module(models.FAMILIES[family].importer)
  try:
    fields = importer.read_config(fmt, path)
  except (KeyError, ValueError) as e:
    if isinstance(e, WeightsFileError):
      raise
    raise WeightsFileError(f'{source}: unsupported or incomplete config: {e}') from e
  return Pretrained(source, fmt, path, family, fields)


def load_pretrained(pre: Pretrained, model) -> list[str]:
  """Writes the checkpoint into `model` in place; returns the dotted paths of the
  feature-map parameters and LoRA factors it lacks (expected: no softmax checkpoint
  has them; `models.new_params`)."""
  try:
    pre.importer.load(model, pre.fmt, pre.path)
  except ValueError as e:
    if isinstance(e, WeightsFileError):
      raise
    raise WeightsFileError(f'{pre.source}: {e}') from e
  return models.new_params(model)


def load_tokenizer(pre: Pretrained):
  """(tokenizers.Tokenizer, {'bos', 'eos', 'padding'} ids) of the checkpoint."""
  return pre.importer.load_tokenizer(pre.fmt, pre.path)
