"""Checkpoints: orbax CheckpointManager, resume with fallback, and params-only init_from.

Layout: `workdir/checkpoints/<step>/{params,opt_state,features,stats,meta}`, `features`
holding the random projections (`ON_DISK`; an item with
nothing in it, e.g. no random features with softmax attention, is not written). Trees are stored as
FLAT dicts keyed by dotted paths ('layers.0.attn.query.kernel') rather than as nnx.State
objects: the names are readable, independent of the Python classes that produced them,
and let `init_from` match parameters by name across models with different attention kinds.

Atomicity comes from orbax: a step is written into `<step>.orbax-checkpoint-tmp-*` and
renamed to `<step>` only when complete, so a process killed mid-save leaves a tmp dir that
the manager ignores (and cleans up). A finalized step whose files were later truncated or
removed fails to restore (zstd checksums / missing metadata); `restore_latest` then moves
it to `workdir/checkpoints_corrupt/` and falls back to the previous step with a warning.
Corrupt means exactly that: unreadable bytes or metadata. A readable step whose names or
shapes differ from the model's is a healthy checkpoint of another model: it is never moved,
and restoring it is a one-line `CheckpointMismatchError`.
"""

import logging
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from performer import errors

log = logging.getLogger(__name__)

ITEMS = ('params', 'opt_state', 'projections', 'stats', 'meta')
# The random-projection trees are 'projections' in memory; on disk their item keeps the name
# 'features' it was first saved under, so every run saved before the rename restores.
ON_DISK = {'projections': 'features'}


def _disk(name):
  return ON_DISK.get(name, name)


# ---------------------------------------------------------------------------- flat trees


def _key_name(key):
  """A path entry's name: DictKey and FlattenedIndexKey .key, SequenceKey .idx, GetAttrKey .name."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_name(path):
  parts = [_key_name(k) for k in path]
  # Variables flatten to their `.value`; drop it so names read like module paths.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    parts = parts[:-1]
  return '.'.join(parts)


def flatten(tree):
  """{dotted path: leaf} for any pytree (nnx.State, optax state, dicts)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat = {_path_name(path): leaf for path, leaf in leaves}
  if len(flat) != len(leaves):
    raise ValueError('two leaves map to the same checkpoint name')
  return flat


def unflatten(template, flat):
  """Puts the leaves of `flat` back into the structure of `template` (matched by name)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  return jax.tree_util.tree_unflatten(treedef, [flat[_path_name(p)] for p, _ in paths])


def _abstract(flat_template, flat_shardings):
  return {
    k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=flat_shardings[k])
    for k, v in flat_template.items()
  }


# ---------------------------------------------------------------------------- manager


def _handlers():
  handlers = {_disk(name): ocp.StandardCheckpointHandler() for name in ITEMS if name != 'meta'}
  return {**handlers, 'meta': ocp.JsonCheckpointHandler()}


class CheckpointError(errors.WeightsFileError):
  """No usable checkpoint where one is required (eval.py, init_from)."""


def make_manager(workdir, keep, read_only=False):
  """The run's CheckpointManager; read_only for eval (never creates, cleans or deletes)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if read_only:
    if not os.path.isdir(directory):
      raise CheckpointError(f'--workdir: no checkpoints directory {directory!r}')
    options = ocp.CheckpointManagerOptions(read_only=True)
  else:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=True
    )
  manager = ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())
  # The tmp-directory cleanup runs in a background thread; wait for it (a few ms) so that a
  # user error raised right after this (a bad init_from, say) exits with its one line
  # instead of the thread's traceback at interpreter shutdown.
  wait = getattr(manager, '_maybe_await_cleanup_tmp_directory', None)
  if wait is not None:
    wait()
  return manager


RUN_PATHS = 'expected a workdir, its checkpoints/ or checkpoints/<step>'


def locate(path, setting='--workdir', error=None):
  """(workdir, step or None): the one rule for a path that names a run's checkpoint.

  `path` is a run's workdir or a checkpoint directory inside it: `workdir/checkpoints`
  (like the workdir: its newest good step) or `workdir/checkpoints/<step>` (that step).
  Anything else is a one-line `error` (default CheckpointError) naming `setting`.
  """
  error = error or CheckpointError
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise error(f'{setting}: {path!r} is a file; {RUN_PATHS}')
  if not os.path.isdir(path):
    raise error(f'{setting}: no such directory {path!r}')
  parent, base = os.path.split(path)
  if os.path.isdir(os.path.join(path, 'params')):
    if not base.isdigit() or os.path.basename(parent) != 'checkpoints':
      raise error(
        f'{setting}: {path!r} has a params/ folder but is not a step directory; {RUN_PATHS}'
      )
    return os.path.dirname(parent), int(base)
  if base == 'checkpoints' and not os.path.isdir(os.path.join(path, 'checkpoints')):
    return parent, None
  if not os.path.isdir(os.path.join(path, 'checkpoints')):
    raise error(f'{setting}: no checkpoints directory in {path!r}; {RUN_PATHS}')
  return path, None


def save(manager, step, trees, meta):
  """Starts an (async) save of the training state at `step`.

  `trees` maps item names of ITEMS (params, opt_state, projections, stats) to pytrees. Orbax
  copies the arrays to host memory before `save` returns, so the caller may donate the
  device buffers to the next train step right away.
  """
  unknown = sorted(set(trees) - set(ITEMS))
  if unknown:
    raise ValueError(f'unknown checkpoint items {unknown}; valid: {ITEMS[:-1]}')
  flat_trees = {name: flatten(tree) for name, tree in trees.items()}
  # Orbax refuses empty items (e.g. no random features with softmax attention): skip them.
  items = {_disk(name): ocp.args.StandardSave(flat) for name, flat in flat_trees.items() if flat}
  manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint of another model (names or shapes differ): left where it is."""


def saved_shapes(manager, step):
  """{item: {name: shape}} from a step's metadata; raises if the metadata is unreadable."""
  composite = manager.item_metadata(step)
  saved = {}
  for name in ITEMS[:-1]:
    if _disk(name) not in composite.keys():
      continue
    meta = composite[_disk(name)]
    if meta is None:
      raise ValueError(f'unreadable metadata of item {name!r}')
    saved[name] = {k: tuple(v.shape) for k, v in getattr(meta, 'tree', meta).items()}
  return saved


def _check_structure(manager, step, templates, new_params=()):
  """CheckpointMismatchError if the step's saved names and shapes are not the templates'
  (parameters named in `new_params` may be missing from it). Returns the missing ones."""
  saved, problems = saved_shapes(manager, step), []
  absent = sorted(set(new_params) - set(saved.get('params', {})))
  for name, tree in templates.items():
    want = {k: tuple(v.shape) for k, v in flatten(tree).items()}
    if name == 'params':
      want = {k: v for k, v in want.items() if k not in absent}
    have = saved.get(name, {})
    if want == have:
      continue
    extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    parts = [f'only in the checkpoint: {extra[:3]}'] if extra else []
    parts += [f'only in the model: {missing[:3]}'] if missing else []
    parts += [f'shape of {k}: {have[k]} saved, {want[k]} now' for k in shapes[:2]]
    problems.append(f'{name} ({"; ".join(parts)})')
  if problems:
    raise CheckpointMismatchError(
      f'checkpoint step {step} under {manager.directory} is a readable checkpoint of another '
      f'model: {", ".join(problems)}; it was left in place: use the config it was trained '
      "with (the run's config.json)"
    )
  return absent


def _quarantine(manager, step, error, move=True):
  """Moves a step that failed to restore out of the manager's way (kept for inspection).

  Moving matters for training: the run falls back to an older step and will later save
  this step number again, which orbax refuses while the damaged directory is there.
  """
  if not move:
    log.warning(
      'checkpoint step %d is corrupt or incomplete (%s: %s); trying the previous one',
      step,
      type(error).__name__,
      ' '.join(str(error).split())[:300],
    )
    return
  src = os.path.join(str(manager.directory), str(step))
  dst_root = os.path.join(os.path.dirname(str(manager.directory)), 'checkpoints_corrupt')
  os.makedirs(dst_root, exist_ok=True)
  dst = os.path.join(dst_root, f'{step}-{int(time.time())}')
  if jax.process_index() == 0 and os.path.exists(src):
    shutil.move(src, dst)
  if jax.process_count() > 1:  # every host must see the move before listing steps again
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(f'quarantine_checkpoint_{step}')
  log.warning(
    'checkpoint step %d is corrupt or incomplete (%s: %s); moved to %s and '
    'falling back to the previous one',
    step,
    type(error).__name__,
    ' '.join(str(error).split())[:300],
    dst,
  )
  manager.reload()


def restore_step(manager, step, templates, shardings, new_params=()):
  """Restores the items named in `templates` (plus meta) of one step; raises on damage,
  and CheckpointMismatchError if the step holds another model. Parameters named in
  `new_params` that the step lacks keep the template's values (arrays, not shapes)."""
  absent = _check_structure(manager, step, templates, new_params)
  stored = {name: flatten(tree) for name, tree in templates.items()}
  if absent:
    stored['params'] = {k: v for k, v in stored['params'].items() if k not in absent}
  targets = {
    _disk(name): ocp.args.StandardRestore(_abstract(stored[name], flatten(shardings[name])))
    for name in templates
    if stored[name]
  }
  restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **targets))
  trees = {
    name: unflatten(tree, {**flatten(tree), **restored[_disk(name)]})
    if _disk(name) in targets
    else tree
    for name, tree in templates.items()
  }
  return trees, dict(restored['meta'])


def restore_latest(manager, templates, shardings, move_corrupt=True, new_params=()):
  """Restores the newest good checkpoint into the structures of the given templates.

  Args:
    manager: from make_manager.
    templates: {item: tree} for some of 'params', 'opt_state', 'projections', 'stats' (arrays
      or ShapeDtypeStructs; they fix the structure). eval.py skips the optimizer state.
    shardings: {item: matching tree of shardings}.
    move_corrupt: move damaged steps to checkpoints_corrupt/ (training); eval only skips.
    new_params: parameters a step may lack (see restore_step).
  Returns:
    (step, {item: restored tree}, meta), or None when there is no usable checkpoint.
  Raises:
    CheckpointMismatchError: the newest readable step belongs to another model.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      trees, meta = restore_step(manager, step, templates, shardings, new_params)
      if int(meta['step']) != step:
        raise ValueError(f'meta says step {meta["step"]}')
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      _quarantine(manager, step, e, move=move_corrupt)
      continue
    return step, trees, meta
  return None


# ---------------------------------------------------------------------------- init_from


class InitFromError(CheckpointError):
  """The init_from checkpoint cannot be mapped onto this model (e.g. a shape differs)."""


def load_params_by_name(path, params, shardings, expected_missing=()):
  """Loads PARAMETERS ONLY from another run into the structure of `params`.

  Matching is by dotted name. Shapes must agree for shared names. Names present in only one
  of the two models are reported (logged as a warning and returned), never silently dropped:
  parameters missing from the checkpoint keep their fresh initialization. Names listed in
  `expected_missing` (feature-map parameters, which a softmax checkpoint never has) are
  reported apart, under 'expected_missing', with no warning when absent. Random features,
  running statistics, optimizer state and step are not taken, so the new run starts at step
  0 with features drawn for its own attention kind.

  Returns:
    (new params, report) where report = {'step', 'only_in_checkpoint', 'only_in_model',
    'expected_missing', 'loaded'}.
  """
  workdir, step = locate(path, 'config.train.init_from', InitFromError)
  directory = os.path.join(workdir, 'checkpoints')
  found = sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True)
  steps = [step] if step is not None else found
  if not steps:
    raise InitFromError(f'config.train.init_from: no checkpoint steps under {directory!r}')
  manager = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={'params': ocp.PyTreeCheckpointHandler()},
  )
  try:
    return _load_params_by_name(manager, directory, steps, params, shardings, set(expected_missing))
  finally:
    manager.close()


def _load_params_by_name(manager, directory, steps, params, shardings, expected_missing):
  flat_model, flat_sh = flatten(params), flatten(shardings)
  last_error = None
  for step in steps:
    try:
      meta = manager.item_metadata(step)['params']
      saved = {k: tuple(v.shape) for k, v in getattr(meta, 'tree', meta).items()}
      shared = sorted(set(saved) & set(flat_model))
      bad = [k for k in shared if saved[k] != tuple(np.shape(flat_model[k]))]
      if bad:
        raise InitFromError(
          'config.train.init_from: shape mismatch for '
          + ', '.join(f'{k} {saved[k]} vs {tuple(np.shape(flat_model[k]))}' for k in bad)
        )
      target = {
        k: jax.ShapeDtypeStruct(saved[k], flat_model[k].dtype, sharding=flat_sh[k]) for k in shared
      }
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          params=ocp.args.PyTreeRestore(
            target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
          )
        ),
      )['params']
    except InitFromError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      last_error = e
      log.warning(
        'init_from: step %d under %s unreadable (%s); trying an older one', step, directory, e
      )
      continue
    missing = set(flat_model) - set(saved)
    report = {
      'step': step,
      'loaded': shared,
      'only_in_checkpoint': sorted(set(saved) - set(flat_model)),
      'only_in_model': sorted(missing - expected_missing),
      'expected_missing': sorted(missing & expected_missing),
    }
    if report['expected_missing']:
      log.info(
        'init_from %s (step %d): %d feature-map parameters are not in the checkpoint, '
        'as expected; they keep their initial values: %s',
        directory,
        step,
        len(report['expected_missing']),
        report['expected_missing'],
      )
    if report['only_in_checkpoint'] or report['only_in_model']:
      log.warning(
        'init_from %s (step %d): parameters only in the checkpoint (not loaded): %s; '
        'only in this model (kept at their fresh init): %s',
        directory,
        step,
        report['only_in_checkpoint'] or 'none',
        report['only_in_model'] or 'none',
      )
    merged = dict(flat_model)
    merged.update({k: restored[k] for k in shared})
    return unflatten(params, merged), report
  raise InitFromError(
    f'config.train.init_from: no readable checkpoint under {directory!r} ({last_error})'
  )
