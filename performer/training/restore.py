"""`restore(path)`: a trained run back from disk, the one way every reader takes.

eval.py (held-out splits, --text_file, --long_context), sample.py, the notebooks and the
training loop's resume all rebuild a run's model here: `build.create_state` builds the
model of the config (the constructor training uses) and `restore_trees` fills it from the
checkpoint. The path rule is `checkpoints.locate`'s: a run's workdir or a checkpoint
directory inside it (`workdir/checkpoints`: the newest good step; `workdir/checkpoints/<step>`:
that step). The config is the run's own, `workdir/config.json` (rundir.py), unless the
caller passes one (already resolved, with eval.py's allowed overrides).

An eval-time option may add parameters the checkpoint never had (an existing hybrid run
evaluated with `model.attention.sinks=4` gains a zero-initialised `sink_log_gain`): the
parameters the config adds to the run's own keep their initial values, and one line on
stderr says so. Any other difference is checkpoints.CheckpointMismatchError.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import ml_collections
from flax import nnx

from performer import models
from performer.training import build, checkpoints, rundir, sharding
from performer.training.state import ModelState

MODEL_ITEMS = ('params', 'projections', 'stats')  # what inference needs: no optimizer state


@dataclasses.dataclass(frozen=True)
class Restored:
  """A run's checkpoint as the model's `models.split` pieces (`state`, on the mesh)."""

  config: Any
  step: int
  state: ModelState
  meta: dict

  @property
  def trees(self):
    """(params, projections, stats, rest): what `nnx.merge(state.graphdef, ...)` takes."""
    s = self.state
    return s.params, s.projections, s.stats, s.rest

  def model(self):
    """The nnx model (stored random features and statistics)."""
    return nnx.merge(self.state.graphdef, *self.trees)


def run_config(workdir):
  """The run's resolved config, from workdir/config.json (written by training)."""
  config = rundir.load_config(workdir)
  if config is None:
    raise rundir.RunConfigError(
      f"no config.json in {workdir!r}: pass the training run's workdir "
      '(or --config with the config file it was trained with)'
    )
  return config


def restore_trees(manager, state, items=MODEL_ITEMS, *, move_corrupt=False, step=None, new=()):
  """(step, {item: tree}, meta) of the newest good checkpoint of `manager` (or of `step`)
  in the structure of `state` (create_state's), or None when there is none; `new` names
  parameters the checkpoint may lack (their values come from `state.params`). Training's
  resume moves damaged steps aside (`move_corrupt`); readers only skip them."""
  templates = {k: state.params if k == 'params' and new else state.abstract[k] for k in items}
  shardings = {k: state.shardings[k] for k in items}
  if step is None:
    return checkpoints.restore_latest(manager, templates, shardings, move_corrupt, new)
  trees, meta = checkpoints.restore_step(manager, step, templates, shardings, new)
  return step, trees, meta


def one_device_mesh():
  """The mesh of a reader on one device (sample.py, notebooks)."""
  one = ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'seq': 1})
  return sharding.make_mesh(one, devices=jax.devices()[:1])


def restore(path, config=None, *, mesh=None, setting='--workdir'):
  """The run at `path` (a workdir or a checkpoint directory in it) as a `Restored`.

  `config`: resolved (build.resolve_config); default the run's config.json. `mesh`:
  default one device. A missing or unusable checkpoint is a one-line CheckpointError
  naming `setting`.
  """
  workdir, step = checkpoints.locate(path, setting)
  config = run_config(workdir) if config is None else config
  mesh = one_device_mesh() if mesh is None else mesh
  state = build.create_state(config, mesh, init='restore')
  added = added_params(config, workdir, state)
  if added:
    flat = {**checkpoints.flatten(state.params), **build.fresh_params(config, state, added)}
    state = dataclasses.replace(state, params=checkpoints.unflatten(state.params, flat))
  manager = checkpoints.make_manager(workdir, 1, read_only=True)
  try:
    restored = restore_trees(manager, state, step=step, new=added)
    if restored is None:
      raise checkpoints.CheckpointError(
        f'{setting}: no usable checkpoint under {manager.directory}'
      )
    step, trees, meta = restored
    kept = sorted(set(added) - set(checkpoints.saved_shapes(manager, step).get('params', {})))
  finally:
    manager.close()
  if kept:
    print(
      f'note: {len(kept)} parameter(s) the config adds to the run are not in checkpoint '
      f'step {step} and keep their initial values: {", ".join(kept[:4])}'
      + (f' and {len(kept) - 4} more' if len(kept) > 4 else ''),
      file=sys.stderr,
    )
  return Restored(
    config=config, step=int(step), state=dataclasses.replace(state, **trees), meta=meta
  )


def added_params(config, workdir, state):
  """The new parameters (`state.new_params`: feature maps, gains, LoRA factors, whose
  initial values are meaningful untrained) of `state`, the model of `config`, that the
  run's own model, built from its config.json, does not have: what eval-time options add.
  () without config.json. A layer or width the config adds is not among them."""
  own = _run_values(config, workdir)
  if own is None:
    return ()
  abstract = nnx.eval_shape(lambda: models.build_model(own.model, rngs=nnx.Rngs(0)))
  theirs = checkpoints.flatten(models.split(abstract)[1])
  return tuple(sorted(set(state.new_params) - set(theirs)))


def _run_values(config, workdir):
  """`config` with the run's own values (its config.json) for the model keys it changes;
  a key newer than the run takes its neutral value (0, False, ''). None when the run has
  no config.json or `config` changes no model key."""
  stored = rundir.load_config(workdir)
  changed = [] if stored is None else rundir.differences(stored, config)[0]
  changed = [(key, old, new) for key, old, new in changed if key.startswith('model.')]
  if not changed:
    return None
  own = config.copy_and_resolve_references()
  try:
    with own.unlocked():
      for key, old, new in changed:
        *parents, leaf = key.split('.')
        node = own
        for part in parents:
          node = node[part]
        node[leaf] = type(new)() if old == rundir.NOT_SET else _tuples(old)
  except (KeyError, TypeError, ValueError):  # not the schema's shape: nothing is let through
    return None
  return own


def _tuples(value):
  """A JSON list back to the tuple the schema uses."""
  return tuple(value) if isinstance(value, list) else value
