"""Explicit key maps from foreign checkpoints onto our NNX parameters.

An importer that guesses (strips prefixes, matches by suffix, reshapes
whatever has the right size) turns a wrong checkpoint into a model that
loads fine and produces garbage. So every importer here writes out its map
in full, one `Entry` per parameter, and `apply_keymap` refuses to load
unless the map and the checkpoint agree exactly:

* every entry's source key is in the checkpoint (else: *missing*),
* every checkpoint key is used by an entry or explicitly ignored (else:
  *unused*: an unknown head or a different architecture),
* every source array has the entry's declared shape (else: *shape
  mismatch*: wrong config or wrong file),
* every trainable parameter of the model is the target of exactly one
  entry (else the map itself is incomplete: a bug in the importer), except
  feature-map parameters (`attention.FeatureParam`, e.g. Hedgehog's W) and
  LoRA factors (`models.LoraParam`): no pretrained checkpoint has them, so
  they keep their initial values and are reported as expected-missing
  (`models.new_params`), never as an error.

All problems are collected and raised together as one ValueError that names
the keys, so a user fixes them in one go.

Layouts: PyTorch `Linear.weight` is [out, in]; Flax kernels are [in, out]
(with the head axis split out for attention: [in, heads, head_dim] and
[heads, head_dim, out]). An entry says `transpose=True` for the torch
layout; after the optional transpose the array is reshaped to the
parameter's shape, which only splits or merges axes (sizes are checked).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from performer import models

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One checkpoint tensor -> one model parameter.

  source: checkpoint key, e.g. 'encoder.layer.0.attention.self.query.weight'.
  target: dotted parameter path in the model, e.g. 'layers.0.attn.query.kernel'.
  shape: the shape the checkpoint tensor must have (its own layout).
  transpose: reverse the axes before reshaping (torch [out, in] -> [in, out]).
  """

  source: str
  target: str
  shape: tuple
  transpose: bool = False


def param_table(model: nnx.Module) -> dict[str, nnx.Param]:
  """Every parameter a checkpoint must provide, by dotted path
  ('layers.0.mlp.up.kernel').

  Random feature matrices and running statistics are not `nnx.Param`s and
  feature-map parameters and LoRA factors are expected to be missing, so none
  of them needs a checkpoint entry: a softmax checkpoint loads into any kind,
  with or without LoRA, as is.
  """
  return {
    '.'.join(str(p) for p in path): node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Param) and not isinstance(node, models.NEW_PARAMS)
  }


def _fmt_shape(shape) -> str:
  return '(' + ', '.join(str(int(s)) for s in shape) + ')'


def check_keymap(
  tensors: Mapping[str, object],
  entries: Iterable[Entry],
  ignore: Iterable[str] = (),
  *,
  model: nnx.Module | None = None,
  what: str = 'checkpoint',
) -> None:
  """Raise ValueError listing every disagreement between map and checkpoint.

  `tensors` only needs `.keys()` and per-key `.shape`. `ignore` lists
  checkpoint keys that are known and deliberately dropped (e.g. BERT's
  `position_ids` buffer, which is not a weight).
  """
  entries = list(entries)
  problems = []
  targets = [e.target for e in entries]
  dup = sorted({t for t in targets if targets.count(t) > 1})
  if dup:
    problems.append(f'parameters mapped twice: {dup}')
  missing = [e.source for e in entries if e.source not in tensors]
  if missing:
    problems.append(f'missing keys ({len(missing)}): {missing}')
  used = {e.source for e in entries} | set(ignore)
  unused = sorted(k for k in tensors.keys() if k not in used)
  if unused:
    problems.append(f'unused keys ({len(unused)}): {unused}')
  bad = []
  for e in entries:
    if e.source in tensors:
      got = tuple(int(s) for s in tensors[e.source].shape)
      if got != tuple(e.shape):
        bad.append(f'{e.source}: got {_fmt_shape(got)}, expected {_fmt_shape(e.shape)}')
  if bad:
    problems.append(f'shape mismatches ({len(bad)}): ' + '; '.join(bad))
  if model is not None:
    table = param_table(model)
    unmapped = sorted(set(table) - set(targets))
    unknown = sorted(set(targets) - set(table))
    if unmapped:
      problems.append(f'model parameters with no entry (importer bug): {unmapped}')
    if unknown:
      problems.append(f'entries for parameters the model lacks (importer bug): {unknown}')
    for e in entries:
      if e.target in table and np.prod(e.shape) != table[e.target].size:
        problems.append(
          f'{e.source} -> {e.target}: {_fmt_shape(e.shape)} cannot become '
          f'{_fmt_shape(table[e.target].shape)} (importer bug)'
        )
  if problems:
    raise ValueError(f'{what} does not match the key map:\n  - ' + '\n  - '.join(problems))


def apply_keymap(
  model: nnx.Module,
  tensors: Mapping[str, np.ndarray],
  entries: Iterable[Entry],
  ignore: Iterable[str] = (),
  *,
  what: str = 'checkpoint',
) -> nnx.Module:
  """Check the map (see `check_keymap`), then write every tensor into `model`.

  Writes in place and returns `model`. Values are cast to the parameter's
  dtype (float32 parameters; bf16 is a compute dtype only). Nothing is
  written unless the whole map checks out, so a failed import never leaves
  a half-loaded model behind. Feature-map parameters and LoRA factors keep
  their initial values and are logged as expected-missing.
  """
  entries = list(entries)
  check_keymap(tensors, entries, ignore, model=model, what=what)
  table = param_table(model)
  for e in entries:
    param = table[e.target]
    arr = np.asarray(tensors[e.source])
    if e.transpose:
      arr = arr.T
    param.value = jnp.asarray(arr.reshape(param.shape), dtype=param.dtype)
  features = models.feature_map_params(model)
  lora = sorted(set(models.new_params(model)) - set(features))
  for kind, missing in (('feature-map', features), ('LoRA', lora)):
    if missing:
      log.info(
        '%s: %d %s parameters are not in the checkpoint, as expected; '
        'they keep their initial values: %s',
        what,
        len(missing),
        kind,
        missing,
      )
  return model
