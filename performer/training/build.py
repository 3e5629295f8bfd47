"""`setup(config)`: everything a run needs before its loop, as one `state.Run`.

Resolves the config (a pretrained checkpoint's architecture, the data vocabulary), builds
the model sharded from the start, the optimizer and its stages, the frozen distillation
teacher and the jitted steps. The loaders live here too, because the teacher, eval.py's
--teacher and the train loop's init_from all load a model the same way: `create_state`
for the shapes, then parameters by name from one of our runs or through a family's key
map from a gguf:/hf: checkpoint.
"""

import dataclasses
import logging

import jax
from flax import nnx

from performer import attention, data, models, tasks
from performer.convert import pretrained
from performer.training import checkpoints, config_utils, optim, sharding
from performer.training import steps as steps_lib
from performer.training.state import ModelState, Run, Teacher

log = logging.getLogger(__name__)


def _fill_from_pretrained(config):
  """Writes a gguf:/hf: init_from checkpoint's family and architecture into config.model.

  A size the config leaves at 0 is taken from the checkpoint; one it sets must agree.
  rope_theta, norm_eps, max_len and the boolean fields always follow the checkpoint.
  """
  pre = pretrained.open_pretrained(config.train.init_from)
  model = config.model
  if model.family != pre.family:
    raise config_utils.ConfigError(
      f'config.model.family: {model.family!r}, but config.train.init_from '
      f'{config.train.init_from} is a {pre.family!r} checkpoint'
    )
  for key in models.FAMILIES[pre.family].pretrained_fields:
    if key not in pre.fields:
      continue
    value, ours = pre.fields[key], model[key]
    always = key in ('rope_theta', 'norm_eps', 'max_len') or isinstance(ours, bool)
    if not always and ours and ours != value:
      raise config_utils.ConfigError(
        f'config.model.{key}: {ours}, but config.train.init_from has {value}; use 0 to '
        'take it from the checkpoint'
      )
    model[key] = type(ours)(value)
  return pre


def resolve_config(config):
  """Fills checkpoint- and data-dependent settings on a copy: a gguf:/hf: init_from's
  architecture (whose model settings config_utils.validate leaves to this point), the
  family's fixed task and positions, vocab_size=0 -> the data vocabulary. Reads metadata
  only; raises ConfigError (or a UserInputError naming a file)."""
  config = config.copy_and_resolve_references()
  if pretrained.is_pretrained(config.train.init_from):
    _fill_from_pretrained(config)
    config_utils.validate_model(config)
  fixed = models.FAMILIES[config.model.family].fixed
  for key in ('task', 'positions'):
    if key in fixed:
      config.model[key] = fixed[key]
  vocab = data.vocab_for(config.data)
  if config.model.vocab_size == 0:
    config.model.vocab_size = int(vocab.size)
  elif config.model.vocab_size < vocab.size:
    raise config_utils.ConfigError(
      f'config.model.vocab_size: {config.model.vocab_size} is smaller than the data '
      f"vocabulary ({vocab.size}); use 0 to take the data's size"
    )
  config.lock()
  return config, vocab


def rng_streams(seed):
  """Independent PRNG streams for training noise, feature redraws and eval masks."""
  base = jax.random.key(seed)
  return {
    'train': jax.random.fold_in(base, 1),
    'redraw': jax.random.fold_in(base, 2),
    'eval': jax.random.fold_in(base, 3),
  }


def create_state(config, mesh, init='jit'):
  """`config`'s model as a `state.ModelState`, sharded on `mesh` from the start.

  `init` says how its values come about: 'jit' (the jitted initializer with out_shardings:
  a fresh run), 'eager' (op by op, then placed: no compilation, for a model whose values
  are all about to be overwritten, a pretrained teacher) or 'restore' (no values: params,
  features and stats stay shapes for a checkpoint to fill, only `rest`, the small RNG-stream
  state, is built; compiling the whole initializer takes 10+ s on a 2-core CPU even for a
  tiny model); `fresh_params` gives chosen parameters their initial values later.
  """
  build = _builder(config)
  abstract_model = nnx.eval_shape(build)
  graphdef, a_params, a_projections, a_stats, a_rest = models.split(abstract_model)
  shard = {
    'params': sharding.param_shardings(mesh, a_params),
    'projections': sharding.replicated_shardings(mesh, a_projections),
    'stats': sharding.replicated_shardings(mesh, a_stats),
    'rest': sharding.replicated_shardings(mesh, a_rest),
  }
  pieces = ('params', 'projections', 'stats', 'rest')

  def init_values():
    return models.split(build())[1:]

  if init == 'eager':
    trees = jax.device_put(init_values(), tuple(shard[k] for k in pieces))
  elif init == 'jit':
    trees = jax.jit(init_values, out_shardings=tuple(shard[k] for k in pieces))()
  elif init == 'restore':
    rest = jax.jit(lambda: models.split(build())[4], out_shardings=shard['rest'])()
    trees = (a_params, a_projections, a_stats, rest)
  else:
    raise ValueError(f"init={init!r}: choose from 'jit', 'eager', 'restore'")
  return ModelState(
    graphdef=graphdef,
    **dict(zip(pieces, trees)),
    shardings=shard,
    abstract={'params': a_params, 'projections': a_projections, 'stats': a_stats},
    new_params=tuple(models.new_params(abstract_model)),  # never in a softmax checkpoint
  )


def _builder(config):
  """The model constructor of every run: parameters from seed, dropout from seed + 1."""
  seed = config.seed
  return lambda: models.build_model(config.model, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def fresh_params(config, state, names):
  """{dotted name: initial value} of the parameters `names` of `state` (create_state's),
  placed as the state places them; XLA computes only these (the rest is dead code)."""
  build, names = _builder(config), sorted(names)
  flat_sh = checkpoints.flatten(state.shardings['params'])

  def init_values():
    flat = checkpoints.flatten(models.split(build())[1])
    return {k: flat[k] for k in names}

  return jax.jit(init_values, out_shardings={k: flat_sh[k] for k in names})()


def setup(config, mesh=None):
  """Everything a run needs before the loop; shared by train_and_evaluate, eval.py, tests.
  The config is validated first (config_utils.validate), before anything is built."""
  sharding.maybe_initialize_distributed()
  config, vocab = resolve_config(config_utils.validate(config))
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  check_batch_size(config, mesh)
  state = create_state(config, mesh)
  flags = optim.stage_flags(state.abstract['params'], config.train)
  tx, schedule = optim.make_optimizer(config.train, flags)
  task = tasks.for_run(config.model, config.train, vocab)
  a_opt = jax.eval_shape(tx.init, state.abstract['params'])
  state = dataclasses.replace(
    state,
    shardings={**state.shardings, 'opt_state': sharding.param_shardings(mesh, a_opt)},
    abstract={**state.abstract, 'opt_state': a_opt},
  )
  replicated, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  teacher = build_teacher(config, mesh) if config.train.distill_from else None
  train_fn, eval_fn = steps_lib.make_step_fns(
    state.graphdef,
    tx,
    schedule,
    task,
    config.train,
    use_dropout=config.model.dropout_rate > 0,
    state_shardings=state.state_shardings(replicated),
    batch_sharding=batch_sh,
    replicated=replicated,
    teacher=teacher,
    flags=flags,
  )
  redraw_fn = jax.jit(attention.redraw_projections, out_shardings=state.shardings['projections'])
  return Run(
    config=config,
    vocab=vocab,
    mesh=mesh,
    model=state,
    tx=tx,
    train_fn=train_fn,
    eval_fn=eval_fn,
    redraw_fn=redraw_fn,
    batch_sharding=batch_sh,
    keys=rng_streams(config.seed),
    teacher=teacher,
  )


def check_batch_size(config, mesh):
  """ConfigError unless the batch splits evenly over the mesh's batch devices."""
  rows = sharding.batch_devices(mesh)
  if config.train.batch_size % rows:
    raise config_utils.ConfigError(
      f'config.train.batch_size: {config.train.batch_size} is not divisible by the '
      f'{rows} devices of the mesh that split the batch (mesh.data * mesh.fsdp)'
    )


def make_eval_fn(config, vocab, mesh, state):
  """The jitted eval step of `config`'s run over `state` (a `ModelState`), without the
  optimizer or a train step: eval.py's. Only a task scored against the original (an
  encoder) builds the teacher; other tasks' eval steps never read it."""
  replicated = sharding.replicated(mesh)
  task = tasks.for_run(config.model, config.train, vocab)
  teacher = build_teacher(config, mesh) if task.needs_teacher else None
  return steps_lib.make_eval_fn(
    state.graphdef,
    task,
    state_shardings=state.state_shardings(replicated),
    batch_sharding=sharding.batch_sharding(mesh),
    replicated=replicated,
    teacher=teacher,
  )


def build_teacher(config, mesh):
  """The frozen distillation teacher: this model with 'softmax' attention, params loaded
  from `config.train.distill_from` by name (every name must match: same architecture).

  Returns a `state.Teacher`; its trees are passed to the train step as an argument,
  outside the optimizer.
  """
  tc = config.train
  tstate, params, report = load_original(config, tc.distill_from, mesh, 'config.train.distill_from')
  log.info(
    'distilling from %s (step %d, softmax teacher, %s, weight %g)',
    tc.distill_from,
    report['step'],
    tc.distill_target,
    tc.distill_weight,
  )
  sh = tstate.shardings
  return Teacher(
    graphdef=tstate.graphdef,
    trees=(params, tstate.projections, tstate.stats, tstate.rest),
    shardings=(sh['params'], sh['projections'], sh['stats'], sh['rest']),
    report=report,
  )


def load_original(config, source, mesh, setting):
  """(state, params, report): `config`'s model as its softmax original (no LoRA factors),
  every parameter loaded by name from `source` (gguf:/hf: or one of our runs): the
  distillation teacher and eval.py's --teacher. `setting` names the source in errors."""
  original = config.copy_and_resolve_references()
  original.model.attention.kind = 'softmax'
  original.model.lora_rank = 0  # the original: no adapters
  state = create_state(original, mesh, init='eager')  # every value is loaded next
  if pretrained.is_pretrained(source):
    params, report = load_pretrained_params(source, state)
  else:
    try:
      params, report = checkpoints.load_params_by_name(
        source, state.params, state.shardings['params']
      )
    except checkpoints.InitFromError as e:  # its messages name init_from
      raise checkpoints.InitFromError(str(e).replace('config.train.init_from', setting)) from e
  if report['only_in_checkpoint'] or report['only_in_model']:
    raise checkpoints.InitFromError(
      f"{setting}: the original must have this model's architecture; "
      f'only in the checkpoint: {report["only_in_checkpoint"] or "none"}; only in the '
      f'model: {report["only_in_model"] or "none"}'
    )
  return state, params, report


def load_pretrained_params(source, state):
  """Params of `state` (create_state's) overwritten by a gguf:/hf: checkpoint through its
  family's key map; returns (params, report) like checkpoints.load_params_by_name."""
  pre = pretrained.open_pretrained(source)
  host = jax.device_get((state.params, state.projections, state.stats, state.rest))
  model = nnx.merge(state.graphdef, *host)
  if models.model_config(model.config).family != pre.family:
    raise config_utils.ConfigError(f'{source} is a {pre.family!r} checkpoint, not this family')
  missing = pretrained.load_pretrained(pre, model)
  params = jax.device_put(models.split(model)[1], state.shardings['params'])
  names = sorted(checkpoints.flatten(params))
  report = {
    'step': 0,
    'source': source,
    'loaded': [n for n in names if n not in set(missing)],
    'expected_missing': missing,
    'only_in_checkpoint': [],
    'only_in_model': [],
  }
  return params, report
