"""The pure train and eval steps over one `TrainState`.

Everything here is a plain function of arrays so it can be `jax.jit`-ed with a donated
state. The model travels as `models.split` pieces inside the state -- params, projections,
stats, rest -- and is rebuilt with `nnx.merge` inside the step (objectives.forward):
splitting once outside the loop and merging inside the trace costs nothing at run time,
while `nnx.jit` in the hot loop would re-walk the object graph on every call. What the
step minimises is an objective of pluggable loss terms (objectives.py); what it predicts
and how it is scored is the `Task`'s (performer/tasks.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from performer import models, tasks
from performer.attention import context_parallel
from performer.training import objectives, optim
from performer.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepProgram:
  """The static half of a step: what `jax.jit` closes over."""

  graphdef: Any
  tx: Any
  schedule: Any
  task: tasks.Task
  objective: Any  # objectives.Supervised or objectives.AttentionTransfer
  grad_accum_steps: int = 1
  use_dropout: bool = False
  trainable: Any = None  # one bool per params leaf (optim.stage_flags); None: all
  teacher_graphdef: Any = None


# A step logs each summed term of its objective per token: 'x_sum' as 'x' (an encoder's
# 'cosine_sum' as 'cosine', attention transfer's 'output_cosine_sum' as 'output_cosine'),
# these three under the names the records have always used.
METRIC_NAMES = {'loss_sum': 'loss', 'correct_sum': 'accuracy', 'distill_sum': 'distill_loss'}


def train_step(state, batch, base_key, teacher=None, *, program):
  """One optimizer update on a global batch; returns (new state, metrics).

  The batch is split into `grad_accum_steps` micro-batches scanned in sequence. Gradients
  of the summed loss are added and divided once by the total weight of the whole batch,
  so the update equals the big-batch update up to float summation order. Running
  statistics are updated by every micro-batch in turn (carried through the scan).
  Parameters outside `trainable` stay bitwise unchanged.

  `teacher` = (params, projections, stats, rest) of a frozen model (distillation, attention
  transfer, an encoder's target), passed as an ARGUMENT: never donated, never in the
  optimizer, no gradient, so the step stays a pure function.
  """
  p = program
  mask_key = jax.random.fold_in(jax.random.fold_in(base_key, 0), state.step)
  dropout_key = jax.random.fold_in(jax.random.fold_in(base_key, 1), state.step)
  inputs, targets, weights = p.task.targets(batch, mask_key)
  total_weight = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)

  def loss_fn(params, stats, micro, key):
    params = optim.freeze(params, p.trainable)
    trees = (params, state.projections, stats, state.rest)
    return p.objective(p.graphdef, trees, micro, key if p.use_dropout else None, teacher)

  grad_fn = jax.grad(loss_fn, has_aux=True)
  full = dict(batch, inputs=inputs, targets=targets, weights=weights)
  if p.grad_accum_steps == 1:
    grads, (sums, stats) = grad_fn(state.params, state.stats, full, dropout_key)
  else:
    # Strided split (micro-batch i = rows i, i+k, ...): each device's contiguous block of
    # the data-sharded batch contributes equally to every micro-batch, so no rows move.
    micro = jax.tree.map(
      lambda x: x.reshape((-1, p.grad_accum_steps) + x.shape[1:]).swapaxes(0, 1), full
    )

    def body(carry, xs):
      i, mb = xs
      totals, s = carry
      g, (sums, s) = grad_fn(state.params, s, mb, jax.random.fold_in(dropout_key, i))
      return (jax.tree.map(jnp.add, totals, (g, sums)), s), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, state.params, state.stats, first, dropout_key)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0], shapes[1][0]))
    ((grads, sums), stats), _ = jax.lax.scan(
      body, (zeros, state.stats), (jnp.arange(p.grad_accum_steps), micro)
    )
  grads = jax.tree.map(lambda g: g / total_weight, grads)
  updates, opt_state = p.tx.update(grads, state.opt_state, state.params)
  params = optim.keep_frozen(optax.apply_updates(state.params, updates), state.params, p.trainable)
  metrics = {
    METRIC_NAMES.get(key, key.removesuffix('_sum')): value / total_weight
    for key, value in sums.items()
    if key.endswith('_sum') and key != 'weight_sum'
  }
  metrics.update(
    tokens=sums['weight_sum'],
    grad_norm=optax.global_norm(grads),
    learning_rate=p.schedule(state.step),
  )
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=stats)
  return new_state, metrics


def eval_step(state, batch, mask_key, teacher=None, *, program):
  """Deterministic forward pass (stored features and statistics, no dropout); returns
  token sums.

  MLM eval masks a fixed (per batch index) 15% of tokens, all with MASK. An encoder is
  scored against its teacher (as in train_step), per token and per sentence.
  """
  p = program
  inputs, targets, weights = p.task.targets(batch, mask_key, evaluating=True)
  out, _ = objectives.forward(p.graphdef, state.trees, inputs, batch)
  t_out = None
  if p.task.needs_teacher:
    t_out, _ = objectives.forward(p.teacher_graphdef, teacher, inputs, batch)
  return p.task.eval_sums(out, t_out, targets, weights, batch)


def model_state(model):
  """A `TrainState` (step 0, no optimizer state) of an nnx model, for `evaluate`."""
  _, params, projections, stats, rest = models.split(model)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=None,
    stats=stats,
    projections=projections,
    rest=rest,
  )


def make_eval_fn(
  graphdef, task, *, state_shardings=None, batch_sharding=None, replicated=None, teacher=None
):
  """The jitted eval step alone, no optimizer: evaluate(state, batch, mask_key) -> token
  sums, for a state without optimizer state. eval.py, notebooks and tools that hold a
  model, and `make_step_fns` (same arguments) use it. `teacher`: a `state.Teacher`, bound
  (an encoder is scored against it)."""
  program = StepProgram(
    graphdef=graphdef,
    tx=None,
    schedule=None,
    task=task,
    objective=None,
    teacher_graphdef=None if teacher is None else teacher.graphdef,
  )
  kwargs = {}
  if state_shardings is not None:  # the batch keeps global_batch's layout
    in_sh = (state_shardings.replace(opt_state=None), None, replicated)
    in_sh += () if teacher is None else (teacher.shardings,)
    kwargs.update(in_shardings=in_sh, out_shardings=replicated)
  mesh = None if batch_sharding is None else batch_sharding.mesh
  evaluate = jax.jit(_traced_in(functools.partial(eval_step, program=program), mesh), **kwargs)
  if teacher is None:
    return evaluate
  trees = tuple(teacher.trees)
  return lambda state, batch, mask_key: evaluate(state, batch, mask_key, trees)


def _traced_in(fn, mesh):
  """fn traced inside `context_parallel.sequence_parallel(mesh)`."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with context_parallel.sequence_parallel(mesh):
      return fn(*args, **kwargs)

  return traced


def make_step_fns(
  graphdef,
  tx,
  schedule,
  task,
  train_config,
  use_dropout,
  state_shardings=None,
  batch_sharding=None,
  replicated=None,
  teacher=None,
  flags=None,
):
  """Jits the train and eval steps; the train step donates its state.

  train(state, batch, key) -> (state, metrics)
  evaluate(state, batch, mask_key) -> token sums, for a state without optimizer state
  (`state.replace(opt_state=None)`)

  `state_shardings` (a `TrainState` of shardings) pins the state's layout, so
  FSDP-sharded parameters stay sharded; `batch_sharding`'s mesh is the one attention
  splits sequences over (mesh axis 'seq'). `teacher` (distillation, attention transfer,
  an encoder): a `state.Teacher`; the returned functions bind its trees. `flags`
  (optim.stage_flags): with a transfer stage, steps below `train_config.transfer_steps`
  run the attention-transfer objective (a second program).
  """
  flags = flags or {'transfer': None, 'train': None}
  t_graphdef = None if teacher is None else teacher.graphdef

  def program(stage):
    return StepProgram(
      graphdef=graphdef,
      tx=tx,
      schedule=schedule,
      task=task,
      objective=objectives.for_config(task, train_config, t_graphdef, stage),
      grad_accum_steps=int(train_config.grad_accum_steps),
      use_dropout=use_dropout,
      trainable=flags[stage],
      teacher_graphdef=t_graphdef,
    )

  mesh = None if batch_sharding is None else batch_sharding.mesh
  train_kwargs = {'donate_argnums': (0,)}
  if state_shardings is not None:  # the batch keeps global_batch's layout
    in_sh = (state_shardings, None, replicated)
    in_sh += () if teacher is None else (teacher.shardings,)
    train_kwargs.update(in_shardings=in_sh, out_shardings=(state_shardings, replicated))

  def jitted(stage):
    return jax.jit(
      _traced_in(functools.partial(train_step, program=program(stage)), mesh), **train_kwargs
    )

  train = jitted('train')
  evaluate = make_eval_fn(
    graphdef,
    task,
    state_shardings=state_shardings,
    batch_sharding=batch_sharding,
    replicated=replicated,
    teacher=teacher,
  )
  transfer_steps = train_config.get('transfer_steps', 0)
  if transfer_steps:
    transfer, stage_2 = jitted('transfer'), train

    def train(state, batch, key, *teacher_trees):
      fn = transfer if int(state.step) < transfer_steps else stage_2
      return fn(state, batch, key, *teacher_trees)

  if teacher is None:
    return train, evaluate
  trees = tuple(teacher.trees)
  return lambda state, batch, key: train(state, batch, key, trees), evaluate
