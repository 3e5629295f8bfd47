"""Pure train and eval steps, losses, BERT masking and the optimizer.

Everything here is a plain function of arrays so it can be `jax.jit`-ed with donated
buffers. The model travels as `models.split` pieces -- (graphdef, params, features, stats,
rest) -- and is rebuilt with `nnx.merge` inside the step: splitting once outside the loop and
merging inside the trace costs nothing at run time, while `nnx.jit` in the hot loop would
re-walk the object graph on every call. The train step returns every piece it changes:
params and optimizer state, and the feature maps' running statistics (`FeatureStats`, which
train steps update and eval freezes).

Losses are per token: every step returns SUMS (loss, correct, weight) so that micro-batches,
devices and eval batches can be added up and divided once, which is what makes gradient
accumulation equal to one big batch.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from performer import models
from performer.attention import FeatureStats, context_parallel
from performer.convert import attention_transfer
from performer.training import optim

# ---------------------------------------------------------------------------- targets


def causal_targets(batch):
  """Position t predicts token t+1 of the same segment; the last position predicts nothing."""
  tokens, mask, seg = batch['tokens'], batch['mask'], batch.get('segment_ids')
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  weights = mask[:, 1:] & mask[:, :-1]
  if seg is not None:
    weights = weights & (seg[:, 1:] == seg[:, :-1])
  weights = jnp.pad(weights, ((0, 0), (0, 1)))
  return tokens, targets, weights


def mlm_targets(batch, key, *, rate, mask_id, special_ids, vocab_size, mask_all=False):
  """BERT masking: pick `rate` of the real tokens; 80% -> MASK, 10% -> random, 10% kept.

  Done inside the (jitted) step with its own key so the data pipeline stays task-agnostic
  and every step sees fresh masks. Special tokens (PAD/BOS/EOS/MASK) are never picked, and
  random replacements are never special tokens. `mask_all` (eval) replaces every picked
  token by MASK: the 10% kept tokens would otherwise be visible answers, inflating accuracy
  and making the number incomparable with the unigram baseline.
  """
  tokens, mask = batch['tokens'], batch['mask']
  special = jnp.asarray(special_ids, jnp.int32)
  is_special = jnp.any(tokens[..., None] == special, axis=-1)
  k_pick, k_how, k_rand = jax.random.split(key, 3)
  picked = mask & ~is_special & jax.random.bernoulli(k_pick, rate, tokens.shape)
  how = jax.random.uniform(k_how, tokens.shape)
  # Sample among the non-special ids: draw an index into [0, V - n_special) and skip specials.
  normal_ids = jnp.setdiff1d(jnp.arange(vocab_size), special, size=vocab_size - len(special_ids))
  random_tokens = normal_ids[jax.random.randint(k_rand, tokens.shape, 0, normal_ids.shape[0])]
  if mask_all:
    return jnp.where(picked, mask_id, tokens).astype(tokens.dtype), tokens, picked
  inputs = jnp.where(picked & (how < 0.8), mask_id, tokens)
  inputs = jnp.where(picked & (how >= 0.8) & (how < 0.9), random_tokens, inputs)
  return inputs.astype(tokens.dtype), tokens, picked


def make_targets(batch, key, task_info, evaluating=False):
  """(inputs, targets, weights) for the task; `key` is only used by MLM.

  The model's `target_offset` says what logits[t] predict: tokens[t+1] (causal LM, shift
  here) or tokens[t] (image AR, where the model shifts its own input right; and MLM).
  """
  if task_info['task'] == 'mlm':
    return mlm_targets(
      batch,
      key,
      rate=task_info['mlm_rate'],
      mask_id=task_info['mask_id'],
      special_ids=task_info['special_ids'],
      vocab_size=task_info['vocab_size'],
      mask_all=evaluating,
    )
  if task_info['task'] == 'encoder':  # hidden states, compared with the teacher's
    return batch['tokens'], batch['tokens'], batch['mask']
  if task_info['target_offset'] == 1:
    return causal_targets(batch)
  return batch['tokens'], batch['tokens'], batch['mask']


def token_sums(logits, targets, weights):
  """Summed cross-entropy, correct predictions and weight over the weighted tokens."""
  logits = logits.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
    'loss_sum': jnp.sum(loss * w),
    'correct_sum': jnp.sum(correct * w),
    'weight_sum': jnp.sum(w),
  }


def _forward(
  graphdef,
  params,
  features,
  stats,
  rest,
  inputs,
  batch,
  *,
  deterministic,
  dropout_key,
  return_hidden=False,
  training=False,
):
  """The model's outputs and its running statistics after the call.

  `training` lets feature maps update their statistics (`use_running_average=False`);
  eval and the distillation teacher keep them frozen.
  """
  # copy=True: fresh Variables owned by this trace, so reseeding, dropout and statistic
  # updates may mutate them.
  model = nnx.merge(graphdef, params, features, stats, rest, copy=True)
  if training:
    model.set_attributes(use_running_average=False, raise_if_not_found=False)
  if not deterministic and dropout_key is not None:
    # Dropout noise is a function of (seed, step, micro-batch) only, so resuming from a
    # checkpoint replays exactly the same noise.
    nnx.reseed(model, dropout=dropout_key)
  kwargs = dict(
    mask=batch['mask'], segment_ids=batch.get('segment_ids'), deterministic=deterministic
  )
  if not return_hidden:
    out, _ = model(inputs, **kwargs)
  else:
    # One forward pass for both: the logits and the final (normalized) hidden states
    # the model sows for the output head.
    (logits, _), sown = models.capture_intermediates(model, inputs, **kwargs)
    out = logits, sown['hidden'].astype(jnp.float32)
  return out, nnx.state(model, FeatureStats)


def encoder_sums(student, teacher, weights):
  """An encoder's task: the per-token squared error to the frozen teacher's hidden
  states (as 'loss_sum') and their cosine similarity (as 'correct_sum')."""
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  student = student.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  cosine = jnp.sum(student * teacher, -1) / jnp.maximum(
    jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1), 1e-9
  )
  return {
    'loss_sum': distill_sum(student, teacher, weights, target='hidden', temperature=1.0),
    'correct_sum': jnp.sum(cosine * w),
    'weight_sum': jnp.sum(w),
  }


def sentence_sums(student, teacher, weights, segment_ids=None):
  """Cosine of mean-pooled sentence embeddings (sentence-transformers' pooling) per
  sentence: a row, or a packed segment of one. {'sentence_cosine_sum', 'sentences'}."""
  b, length, _ = student.shape
  w = weights.astype(jnp.float32)[..., None]
  seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
  ids = (jnp.arange(b)[:, None] * length + seg).reshape(-1)
  pool = lambda x: jax.ops.segment_sum(
    (x.astype(jnp.float32) * w).reshape(b * length, -1), ids, b * length
  )
  s_emb, t_emb = pool(student), pool(jax.lax.stop_gradient(teacher))
  count = jax.ops.segment_sum(w.reshape(-1), ids, b * length)
  norms = jnp.linalg.norm(s_emb, axis=-1) * jnp.linalg.norm(t_emb, axis=-1)
  cosine = jnp.sum(s_emb * t_emb, -1) / jnp.maximum(norms, 1e-12)
  real = count > 0
  return {
    'sentence_cosine_sum': jnp.sum(jnp.where(real, cosine, 0.0)),
    'sentences': jnp.sum(real.astype(jnp.float32)),
  }


def distill_sum(student, teacher, weights, *, target, temperature):
  """Summed per-token distance from the (frozen) teacher, weighted like the task loss.

  'logits': KL(teacher || student) of the temperature-softened distributions, times T^2
  (Hinton et al.) so its gradient scale does not depend on T. 'hidden': squared error of
  the final hidden states, averaged over the feature dimension.
  """
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  student = student.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  if target == 'hidden':
    per_token = jnp.mean(jnp.square(student - teacher), axis=-1)
  else:
    t_logp = jax.nn.log_softmax(teacher / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(student / temperature, axis=-1)
    per_token = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * temperature**2
  return jnp.sum(per_token * w)


def _transfer_loss(graphdef, params, features, stats, rest, micro, teacher, distill):
  """Attention transfer: the student's attention modules on the teacher's captured
  layer inputs (its statistics update as in training)."""
  t_model = nnx.merge(distill['graphdef'], *teacher, copy=True)
  kwargs = dict(mask=micro['mask'], segment_ids=micro.get('segment_ids'), deterministic=True)
  _, captured = models.capture_intermediates(t_model, micro['inputs'], **kwargs)
  student = nnx.merge(graphdef, params, features, stats, rest, copy=True)
  student.set_attributes(use_running_average=False, raise_if_not_found=False)
  sums = attention_transfer.transfer_sums(
    student,
    captured,
    micro['mask'],
    micro.get('segment_ids'),
    loss=distill['transfer_loss'],
    weights=micro['weights'],
  )
  return sums['loss_sum'], (sums, nnx.state(student, FeatureStats))


# ---------------------------------------------------------------------------- steps


def train_step(
  params,
  opt_state,
  stats,
  features,
  rest,
  batch,
  step,
  base_key,
  teacher=None,
  *,
  graphdef,
  tx,
  schedule,
  task_info,
  grad_accum_steps,
  use_dropout,
  distill=None,
  objective='task',
  trainable=None,
):
  """One optimizer update on a global batch; returns (params, opt_state, stats, metrics).

  `objective` 'transfer' (attention transfer, optim.py's first stage) replaces the task
  loss by `attention_transfer.transfer_sums` against the teacher's captured layers.
  `trainable` (one bool per params leaf, None = all) freezes the rest bitwise.

  The batch is split into `grad_accum_steps` micro-batches scanned in sequence. Gradients
  of the summed loss are added and divided once by the total weight of the whole batch,
  so the update equals the big-batch update up to float summation order. Running
  statistics are updated by every micro-batch in turn (carried through the scan).

  Distillation: `teacher` = (params, features, stats, rest) of a frozen model with graphdef
  `distill['graphdef']`, passed as an ARGUMENT (never donated, never in the optimizer, no
  gradient) so the step stays a pure function. The loss adds `distill['weight']` times
  `distill_sum`; the reported 'loss' stays the task's cross-entropy and 'distill_loss' is the
  per-token distance to the teacher.
  """
  mask_key = jax.random.fold_in(jax.random.fold_in(base_key, 0), step)
  dropout_key = jax.random.fold_in(jax.random.fold_in(base_key, 1), step)
  inputs, targets, weights = make_targets(batch, mask_key, task_info)
  total_weight = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)

  transfer = objective == 'transfer'
  distilling = (
    teacher is not None and distill is not None and task_info['task'] != 'encoder' and not transfer
  )
  hidden = distilling and distill['target'] == 'hidden'

  def loss_fn(p, s, micro, key):
    p = optim.freeze(p, trainable)
    if transfer:
      return _transfer_loss(graphdef, p, features, s, rest, micro, teacher, distill)
    out, new_stats = _forward(
      graphdef,
      p,
      features,
      s,
      rest,
      micro['inputs'],
      micro,
      deterministic=not use_dropout,
      dropout_key=key,
      return_hidden=hidden,
      training=True,
    )
    if task_info['task'] == 'encoder':
      t_out, _ = _forward(
        distill['graphdef'], *teacher, micro['inputs'], micro, deterministic=True, dropout_key=None
      )
      sums = encoder_sums(out, t_out, micro['weights'])
      return sums['loss_sum'], (sums, new_stats)
    logits = out[0] if hidden else out
    sums = token_sums(logits, micro['targets'], micro['weights'])
    if not distilling:
      return sums['loss_sum'], (sums, new_stats)
    t_out, _ = _forward(
      distill['graphdef'],
      *teacher,
      micro['inputs'],
      micro,
      deterministic=True,
      dropout_key=None,
      return_hidden=hidden,
    )
    student, target = (out[1], t_out[1]) if hidden else (logits, t_out)
    sums['distill_sum'] = distill_sum(
      student,
      target,
      micro['weights'],
      target=distill['target'],
      temperature=distill['temperature'],
    )
    return sums['loss_sum'] + distill['weight'] * sums['distill_sum'], (sums, new_stats)

  grad_fn = jax.grad(loss_fn, has_aux=True)
  full = dict(batch, inputs=inputs, targets=targets, weights=weights)
  if grad_accum_steps == 1:
    grads, (sums, stats) = grad_fn(params, stats, full, dropout_key)
  else:
    # Strided split (micro-batch i = rows i, i+k, ...): each device's contiguous block of
    # the data-sharded batch contributes equally to every micro-batch, so no rows move.
    micro = jax.tree.map(
      lambda x: x.reshape((-1, grad_accum_steps) + x.shape[1:]).swapaxes(0, 1), full
    )

    def body(carry, xs):
      i, mb = xs
      totals, s = carry
      g, (sums, s) = grad_fn(params, s, mb, jax.random.fold_in(dropout_key, i))
      return (jax.tree.map(jnp.add, totals, (g, sums)), s), None

    sum_keys = ('loss_sum', 'correct_sum', 'weight_sum') + (('distill_sum',) if distilling else ())
    zeros = (
      jax.tree.map(jnp.zeros_like, params),
      {k: jnp.zeros((), jnp.float32) for k in sum_keys},
    )
    ((grads, sums), stats), _ = jax.lax.scan(
      body, (zeros, stats), (jnp.arange(grad_accum_steps), micro)
    )
  grads = jax.tree.map(lambda g: g / total_weight, grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optim.keep_frozen(optax.apply_updates(params, updates), params, trainable)
  metrics = {
    'loss': sums['loss_sum'] / total_weight,
    'accuracy': sums['correct_sum'] / total_weight,
    'tokens': sums['weight_sum'],
    'grad_norm': optax.global_norm(grads),
    'learning_rate': schedule(step),
  }
  if distilling:
    metrics['distill_loss'] = sums['distill_sum'] / total_weight
  return params, opt_state, stats, metrics


def eval_step(
  params, stats, features, rest, batch, mask_key, teacher=None, *, graphdef, task_info, distill=None
):
  """Deterministic forward pass (stored features and statistics, no dropout); returns
  token sums.

  MLM eval masks a fixed (per batch index) 15% of tokens, all with MASK. An encoder is
  scored against its teacher (`teacher`, as in train_step).
  """
  inputs, targets, weights = make_targets(batch, mask_key, task_info, evaluating=True)
  out, _ = _forward(
    graphdef, params, features, stats, rest, inputs, batch, deterministic=True, dropout_key=None
  )
  if task_info['task'] == 'encoder':
    t_out, _ = _forward(
      distill['graphdef'], *teacher, inputs, batch, deterministic=True, dropout_key=None
    )
    sums = encoder_sums(out, t_out, weights)
    return {**sums, **sentence_sums(out, t_out, weights, batch.get('segment_ids'))}
  return token_sums(out, targets, weights)


def build_task_info(model_config, train_config, vocab, target_offset):
  """Static facts the steps need about the task, model and vocabulary."""
  special = tuple(
    sorted(
      {
        int(i)
        for i in (getattr(vocab, name, None) for name in ('pad_id', 'bos_id', 'eos_id', 'mask_id'))
        if i is not None and 0 <= int(i) < model_config.vocab_size
      }
    )
  )
  return {
    'task': model_config.task,
    'target_offset': int(target_offset),
    'mlm_rate': float(train_config.mlm_mask_rate),
    'mask_id': int(
      getattr(vocab, 'mask_id', None) if getattr(vocab, 'mask_id', None) is not None else -1
    ),
    'special_ids': special,
    'vocab_size': int(model_config.vocab_size),
  }


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
  task_info,
  train_config,
  use_dropout,
  state_shardings=None,
  batch_sharding=None,
  replicated=None,
  teacher=None,
  flags=None,
):
  """Jits the train and eval steps; params, optimizer state and statistics are donated.

  train(params, opt_state, stats, features, rest, batch, step, key)
      -> (params, opt_state, stats, metrics)
  evaluate(params, stats, features, rest, batch, mask_key) -> token sums

  With `state_shardings` = (params, opt_state, stats, features, rest) shardings, the inputs
  are pinned and the outputs keep the same layout, so FSDP-sharded parameters stay sharded.
  `teacher` (distillation): {'graphdef', 'trees': (params, features, stats, rest),
  'shardings'}. The jitted step takes the teacher trees as its last argument; the returned
  train function binds them, so callers keep one signature whether or not they distil.
  `flags` (optim.stage_flags): with a transfer stage, steps below
  `train_config.transfer_steps` run the attention-transfer step (a second program).
  """
  flags = flags or {'transfer': None, 'train': None}
  distill = None
  if teacher is not None:
    distill = {
      'graphdef': teacher['graphdef'],
      'weight': float(train_config.distill_weight),
      'target': train_config.distill_target,
      'temperature': float(train_config.distill_temperature),
      'transfer_loss': train_config.get('transfer_loss', 'mse'),
    }
  step_fn = functools.partial(
    train_step,
    graphdef=graphdef,
    tx=tx,
    schedule=schedule,
    task_info=task_info,
    grad_accum_steps=train_config.grad_accum_steps,
    use_dropout=use_dropout,
    distill=distill,
  )
  evaluate = functools.partial(eval_step, graphdef=graphdef, task_info=task_info, distill=distill)
  if batch_sharding is not None:  # attention splits the length over the mesh's `seq` axis
    step_fn = _traced_in(step_fn, batch_sharding.mesh)
    evaluate = _traced_in(evaluate, batch_sharding.mesh)
  train_kwargs, eval_kwargs = {'donate_argnums': (0, 1, 2)}, {}
  if state_shardings is not None:
    p_sh, o_sh, s_sh, f_sh, r_sh = state_shardings
    # the batch keeps the layout `sharding.global_batch` gave it ([B] leaves: rows only)
    in_sh = (p_sh, o_sh, s_sh, f_sh, r_sh, None, replicated, replicated)
    eval_sh = (p_sh, s_sh, f_sh, r_sh, None, replicated)
    if teacher is not None:
      in_sh += (teacher.get('shardings'),)
      eval_sh += (teacher.get('shardings'),)
    train_kwargs.update(in_shardings=in_sh, out_shardings=(p_sh, o_sh, s_sh, replicated))
    eval_kwargs.update(in_shardings=eval_sh, out_shardings=replicated)
  train = jax.jit(functools.partial(step_fn, trainable=flags['train']), **train_kwargs)
  evaluate = jax.jit(evaluate, **eval_kwargs)
  transfer_steps = train_config.get('transfer_steps', 0)
  if transfer_steps:
    transfer = jax.jit(
      functools.partial(step_fn, objective='transfer', trainable=flags['transfer']), **train_kwargs
    )
    stage_2 = train

    def train(params, opt_state, stats, features, rest, batch, step, *rest_args):
      fn = transfer if int(step) < transfer_steps else stage_2
      return fn(params, opt_state, stats, features, rest, batch, step, *rest_args)

  if teacher is None:
    return train, evaluate
  jitted, jitted_eval, trees = train, evaluate, tuple(teacher['trees'])

  def train_with_teacher(params, opt_state, stats, features, rest, batch, step, base_key):
    return jitted(params, opt_state, stats, features, rest, batch, step, base_key, trees)

  def evaluate_with_teacher(params, stats, features, rest, batch, mask_key):
    return jitted_eval(params, stats, features, rest, batch, mask_key, trees)

  return train_with_teacher, evaluate_with_teacher
