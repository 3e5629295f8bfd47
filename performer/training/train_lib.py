"""`train_and_evaluate(config, workdir)`: one training loop for every task.

Shaped after Flax's examples/lm1b: build state, restore if a checkpoint exists, loop over
steps with periodic logging / eval / checkpoints, then a final evaluation. The model lives
as `nnx.split` pieces for the whole run:

  graphdef  static structure, closed over by the jitted steps
  params    nnx.Param           -> optimized, FSDP-sharded, donated to the step
                                   (feature-map parameters, attention.FeatureParam, too)
  features  RandomProjection      -> redrawn every `train.redraw_every` steps, checkpointed
  stats     FeatureStats        -> running statistics, updated and returned by the step,
                                   frozen in eval, checkpointed
  rest      everything else     -> (dropout RNG streams) reseeded inside the step

Every random choice is a pure function of (config.seed, step): dropout, MLM masks, feature
redraws and (through the data iterator's checkpointed position) the batch order. That is
what makes a killed-and-resumed run end with bitwise the same parameters.
"""

import base64
import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from performer import attention, data, models
from performer.convert import attention_transfer, pretrained
from performer.training import checkpoints, config_utils, optim, sharding
from performer.training import metrics as metrics_lib
from performer.training import steps as steps_lib
from performer.training.state import ModelState, Run, Teacher
from performer.training.task import Task

log = logging.getLogger(__name__)


# Architecture fields a pretrained checkpoint decides (convert/pretrained.py).
PRETRAINED_FIELDS = (
  'vocab_size', 'num_layers', 'num_heads', 'num_kv_heads', 'emb_dim', 'mlp_dim', 'head_dim',
  'max_len', 'rope_theta', 'norm_eps', 'tie_embeddings', 'type_vocab_size', 'pooler',
)  # fmt: skip


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
  for key in PRETRAINED_FIELDS:
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
  architecture, the family's fixed task and positions, vocab_size=0 -> the data
  vocabulary. Raises ConfigError (or a UserInputError naming a file)."""
  config = config.copy_and_resolve_references()
  if pretrained.is_pretrained(config.train.init_from):
    _fill_from_pretrained(config)
  fixed = models.FAMILIES[config.model.family].fixed
  for key in ('task', 'positions'):
    if key in fixed:
      config.model[key] = fixed[key]
  config_utils._validate_model(config.model)  # pylint: disable=protected-access
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


def _keys(seed):
  """Independent PRNG streams for training noise, feature redraws and eval masks."""
  base = jax.random.key(seed)
  return {
    'train': jax.random.fold_in(base, 1),
    'redraw': jax.random.fold_in(base, 2),
    'eval': jax.random.fold_in(base, 3),
  }


def redraw_key(seed, step):
  """The key for the features used from `step` on (a function of seed and step only)."""
  return jax.random.fold_in(_keys(seed)['redraw'], step)


def should_redraw(step, redraw_every):
  """Features are redrawn before steps redraw_every, 2*redraw_every, ... (never at 0)."""
  return redraw_every > 0 and step > 0 and step % redraw_every == 0


def create_state(config, mesh, eager=False):
  """Builds the model sharded from the start (jitted init with out_shardings), or with
  `eager` op by op and then placed: no compilation, for a model whose values are all about
  to be overwritten (a pretrained teacher).

  Returns a `state.ModelState`.
  """
  seed = config.seed

  def build():
    return models.build_model(config.model, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

  abstract_model = nnx.eval_shape(build)
  graphdef, a_params, a_features, a_stats, a_rest = models.split(abstract_model)
  shard = {
    'params': sharding.param_shardings(mesh, a_params),
    'features': sharding.replicated_shardings(mesh, a_features),
    'stats': sharding.replicated_shardings(mesh, a_stats),
    'rest': sharding.replicated_shardings(mesh, a_rest),
  }
  pieces = ('params', 'features', 'stats', 'rest')

  def init():
    return models.split(build())[1:]

  if eager:
    trees = jax.device_put(init(), tuple(shard[k] for k in pieces))
  else:
    trees = jax.jit(init, out_shardings=tuple(shard[k] for k in pieces))()
  return ModelState(
    graphdef=graphdef,
    **dict(zip(pieces, trees)),
    shardings=shard,
    abstract={'params': a_params, 'features': a_features, 'stats': a_stats},
    feature_params=tuple(models.new_params(abstract_model)),  # never in a softmax checkpoint
    target_offset=int(getattr(abstract_model, 'target_offset', 1)),
  )


def model_batch(batch, data_config):
  """Drops `segment_ids` unless rows are packed: with one sequence per row they carry no
  information, and passing them would send attention through the (slower) packed path."""
  if data_config.pack:
    return batch
  return {k: v for k, v in batch.items() if k != 'segment_ids'}


def _pad_batch(batch, batch_size):
  """Pads a short (final eval) batch with all-masked rows so shapes and shardings hold."""
  n = batch['tokens'].shape[0]
  if n == batch_size:
    return batch
  return {
    k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
    for k, v in batch.items()
  }


def _local_batch_size(global_size):
  if global_size % jax.process_count():
    raise ValueError(f'batch size {global_size} is not divisible by {jax.process_count()} hosts')
  return global_size // jax.process_count()


def evaluate(eval_fn, state, config, split, *, batch_sharding, eval_key, num_batches=0):
  """Deterministic eval of a `TrainState` (its optimizer state unused) over `num_batches`
  batches of `split` (<= 0: the whole split)."""
  state = state.replace(opt_state=None)
  local_bs = _local_batch_size(config.train.batch_size)
  it = data.build_dataset(
    config.data,
    split=split,
    batch_size=local_bs,
    seed=config.seed,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
    num_epochs=1,
  )
  totals = None
  for i, batch in enumerate(it):
    if 0 < num_batches <= i:
      break
    batch = _pad_batch(batch, local_bs)
    models.check_tokens(batch['tokens'], config.model.vocab_size)
    batch = model_batch(batch, config.data)
    sums = eval_fn(
      state, sharding.global_batch(batch, batch_sharding), jax.random.fold_in(eval_key, i)
    )
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f'the {split!r} split produced no batches')
  return metrics_lib.summarize(jax.device_get(totals), config.model.task)


def _data_state(it):
  """The iterator's position as JSON (grain states are dicts, or bytes for older APIs)."""
  get_state = getattr(it, 'get_state', None)
  state = get_state() if get_state is not None else None
  if isinstance(state, bytes):
    return {'base64': base64.b64encode(state).decode('ascii')}
  return state


def _restore_data_position(it, meta, step):
  """Puts the iterator where it was at the checkpoint, or replays `step` batches."""
  state = meta.get('data_state')
  if state is not None and hasattr(it, 'set_state'):
    if isinstance(state, dict) and set(state) == {'base64'}:
      state = base64.b64decode(state['base64'])
    it.set_state(state)
    return
  for _ in range(step):
    next(it)


def setup(config, mesh=None):
  """Everything a run needs before the loop; shared by train_and_evaluate, eval.py, tests."""
  sharding.maybe_initialize_distributed()
  config, vocab = resolve_config(config)
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rows = sharding.batch_devices(mesh)
  if config.train.batch_size % rows:
    raise config_utils.ConfigError(
      f'config.train.batch_size: {config.train.batch_size} is not divisible by the '
      f'{rows} devices of the mesh that split the batch (mesh.data * mesh.fsdp)'
    )
  state = create_state(config, mesh)
  check_stages(config)
  flags = optim.stage_flags(state.abstract['params'], config.train)
  tx, schedule = optim.make_optimizer(config.train, flags)
  task = Task.from_config(config.model, config.train, vocab, state.target_offset)
  a_opt = jax.eval_shape(tx.init, state.abstract['params'])
  state = dataclasses.replace(
    state,
    shardings={**state.shardings, 'opt_state': sharding.param_shardings(mesh, a_opt)},
    abstract={**state.abstract, 'opt_state': a_opt},
  )
  replicated, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  if config.model.task == 'encoder' and not config.train.distill_from:
    raise config_utils.ConfigError(
      'config.train.distill_from: an encoder trains by distillation from its softmax '
      'original; name it (e.g. the same hf:DIR as init_from)'
    )
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
  redraw_fn = jax.jit(attention.redraw_projections, out_shardings=state.shardings['features'])
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
    keys=_keys(config.seed),
    teacher=teacher,
  )


DISTILL_TARGETS = ('logits', 'hidden')


def check_stages(config):
  """One-line ConfigErrors for the transfer stage and `train.trainable`."""
  tc, error = config.train, config_utils.ConfigError
  if tc.trainable not in optim.TRAINABLE:
    raise error(
      f'config.train.trainable: {tc.trainable!r}; choose from {", ".join(optim.TRAINABLE)}'
    )
  if tc.trainable == 'lora' and not config.model.lora_rank:
    raise error('config.train.trainable=lora needs config.model.lora_rank > 0')
  if not 0 <= tc.transfer_steps <= tc.num_steps:
    raise error(f'config.train.transfer_steps: {tc.transfer_steps} is not in [0, num_steps]')
  if tc.transfer_steps and not tc.distill_from:
    raise error(
      'config.train.transfer_steps: attention transfer learns from a softmax teacher; set '
      'config.train.distill_from (e.g. the same source as init_from)'
    )
  if tc.transfer_loss not in attention_transfer.LOSSES:
    raise error(
      f'config.train.transfer_loss: {tc.transfer_loss!r}; choose from '
      f'{", ".join(attention_transfer.LOSSES)}'
    )


def build_teacher(config, mesh):
  """The frozen distillation teacher: this model with 'softmax' attention, params loaded
  from `config.train.distill_from` by name (every name must match: same architecture).

  Returns a `state.Teacher`; its trees are passed to the train step as an argument,
  outside the optimizer.
  """
  tc = config.train
  if tc.distill_target not in DISTILL_TARGETS:
    raise config_utils.ConfigError(
      f'config.train.distill_target: unknown value '
      f'{tc.distill_target!r}; choose from logits, hidden'
    )
  if not tc.distill_temperature > 0 or tc.distill_weight < 0:
    raise config_utils.ConfigError(
      'config.train.distill_temperature must be > 0 and config.train.distill_weight >= 0'
    )
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
    trees=(params, tstate.features, tstate.stats, tstate.rest),
    shardings=(sh['params'], sh['features'], sh['stats'], sh['rest']),
    report=report,
  )


def load_original(config, source, mesh, setting):
  """(state, params, report): `config`'s model as its softmax original (no LoRA factors),
  every parameter loaded by name from `source` (gguf:/hf: or one of our runs): the
  distillation teacher and eval.py's --teacher. `setting` names the source in errors."""
  original = config.copy_and_resolve_references()
  original.model.attention.kind = 'softmax'
  original.model.lora_rank = 0  # the original: no adapters
  state = create_state(original, mesh, eager=True)  # every value is loaded next
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
  host = jax.device_get((state.params, state.features, state.stats, state.rest))
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


def _initial_state(run, manager, workdir):
  """Resume from workdir, else init_from (params only), else fresh. Returns (TrainState,
  meta, init report or None).

  A checkpoint in the workdir always wins over train.init_from, so restarting a fine-tuning
  run resumes it instead of starting the fine-tuning over.
  """
  config, model = run.config, run.model
  sh, abstract = model.shardings, model.abstract
  items = ('params', 'opt_state', 'features', 'stats')
  restored = checkpoints.restore_latest(
    manager, {k: abstract[k] for k in items}, {k: sh[k] for k in items}
  )
  if restored is not None:
    step, trees, meta = restored
    log.info('resumed from %s at step %d', manager.directory, step)
    state = model.train_state(step).replace(**trees)
    return state, meta, None
  params, report = model.params, None
  if pretrained.is_pretrained(config.train.init_from):
    params, report = load_pretrained_params(config.train.init_from, model)
  elif config.train.init_from:
    params, report = checkpoints.load_params_by_name(
      config.train.init_from, params, sh['params'], expected_missing=model.feature_params
    )
  if report is not None:
    if jax.process_index() == 0:  # a record of exactly what was (not) transferred
      with open(os.path.join(workdir, 'init_from.json'), 'w', encoding='utf-8') as f:
        json.dump({'init_from': config.train.init_from, **report}, f, indent=1)
    log.info(
      'initialized %d parameters from %s (step %d)',
      len(report['loaded']),
      config.train.init_from,
      report['step'],
    )
  opt_state = jax.jit(run.tx.init, out_shardings=sh['opt_state'])(params)
  return model.train_state(0, opt_state, params), {}, report


def train_and_evaluate(config, workdir, *, progress=None):
  """Trains `config` in `workdir` (resuming if it holds checkpoints) and evaluates.

  Returns a dict: 'step', 'params', 'features', 'final' ({split: metrics}), 'unigram'
  (when the data module has a baseline) and 'init_report' (with train.init_from).
  """
  run = setup(config)
  config, keys = run.config, run.keys
  tc = config.train
  metrics_lib.write_config(config, workdir)
  manager = checkpoints.make_manager(workdir, tc.keep_checkpoints)
  ts, meta, init_report = _initial_state(run, manager, workdir)
  step = int(ts.step)
  writer = metrics_lib.MetricWriter(workdir, start_step=step)
  log.info(
    'model: %d parameters, attention %s; mesh %s',
    sum(x.size for x in jax.tree.leaves(ts.params)),
    config.model.attention.kind,
    ' x '.join(f'{name}={size}' for name, size in run.mesh.shape.items()),
  )

  train_it = data.build_dataset(
    config.data,
    split='train',
    batch_size=_local_batch_size(tc.batch_size),
    seed=config.seed,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
    num_epochs=None,
  )
  if step:
    _restore_data_position(train_it, meta, step)
  tokens_per_step = tc.batch_size * config.data.seq_len
  bar = metrics_lib.Progress(tc.num_steps, step, enabled=progress)
  pending, last_time, last_step = [], time.perf_counter(), step
  ts = jax.device_put(ts, run.model.state_shardings(sharding.replicated(run.mesh)))
  eval_kwargs = dict(batch_sharding=run.batch_sharding, eval_key=keys['eval'])

  while step < tc.num_steps:
    if should_redraw(step, tc.redraw_every) and jax.tree.leaves(ts.features):
      ts = ts.replace(features=run.redraw_fn(ts.features, redraw_key(config.seed, step)))
    batch = next(train_it)
    models.check_tokens(batch['tokens'], config.model.vocab_size)
    batch = sharding.global_batch(model_batch(batch, config.data), run.batch_sharding)
    ts, step_metrics = run.train_fn(ts, batch, keys['train'])
    pending.append(step_metrics)
    step += 1
    bar.advance()
    if step % tc.log_every == 0 or step == tc.num_steps:
      host = jax.device_get(pending)
      now = time.perf_counter()
      rate = (step - last_step) / max(now - last_time, 1e-9)
      # Keys of the latest step: a window may straddle the transfer -> train switch.
      summary = {k: float(np.mean([m[k] for m in host if k in m])) for k in host[-1]}
      summary.update(steps_per_sec=rate, tokens_per_sec=rate * tokens_per_step)
      writer.write(step, 'train', summary)
      bar.set_rates(rate, rate * tokens_per_step)
      log.info(
        'step %d%s: loss %.5g accuracy %.4f%s | %.2f steps/s %.0f tokens/s',
        step,
        ' (attention transfer: layer MSE, output cosine)' if step <= tc.transfer_steps else '',
        summary['loss'],
        summary['accuracy'],
        f' distill {summary["distill_loss"]:.4f}' if 'distill_loss' in summary else '',
        rate,
        rate * tokens_per_step,
      )
      pending, last_time, last_step = [], now, step
    if tc.eval_every and (step % tc.eval_every == 0 and step < tc.num_steps):
      result = evaluate(
        run.eval_fn, ts, config, 'validation', num_batches=tc.eval_batches, **eval_kwargs
      )
      writer.write(step, 'validation', result)
      log.info('step %d validation: %s', step, _fmt(result))
      last_time = time.perf_counter()
    if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.num_steps:
      checkpoints.save(
        manager,
        step,
        {
          'params': ts.params,
          'opt_state': ts.opt_state,
          'features': ts.features,
          'stats': ts.stats,
        },
        {'step': step, 'data_state': _data_state(train_it)},
      )
  bar.close()
  manager.wait_until_finished()
  manager.close()

  final = {}
  for split in ('validation', 'test'):
    final[split] = evaluate(run.eval_fn, ts, config, split, num_batches=0, **eval_kwargs)
  unigram = held_out_extras(config, final)
  for split in final:
    writer.write(step, f'final_{split}', final[split])
  writer.close()
  print_summary(config, step, final, unigram, progress_write=bar.write)
  return {
    'step': step,
    'params': ts.params,
    'features': ts.features,
    'stats': ts.stats,
    'rest': ts.rest,
    'final': final,
    'unigram': unigram,
    'init_report': init_report,
  }


def evaluate_checkpoint(config, workdir, splits=('validation', 'test'), num_batches=0):
  """Evaluates the newest good checkpoint of `workdir` (params, features, statistics)."""
  run = setup(config)
  config, model = run.config, run.model
  sh = model.shardings
  manager = checkpoints.make_manager(workdir, config.train.keep_checkpoints, read_only=True)
  items = ('params', 'features', 'stats')
  restored = checkpoints.restore_latest(
    manager, {k: model.abstract[k] for k in items}, {k: sh[k] for k in items}, move_corrupt=False
  )
  manager.close()
  if restored is None:
    raise checkpoints.CheckpointError(f'--workdir: no usable checkpoint under {manager.directory}')
  step, trees, _ = restored
  restored_state = model.train_state(step).replace(**trees)
  results = {
    split: evaluate(
      run.eval_fn,
      restored_state,
      config,
      split,
      batch_sharding=run.batch_sharding,
      eval_key=run.keys['eval'],
      num_batches=num_batches,
    )
    for split in splits
  }
  unigram = held_out_extras(config, results)
  print_summary(config, step, results, unigram)
  return {'step': step, 'final': results, 'unigram': unigram}


def held_out_extras(config, results):
  """Adds per-word perplexity to text results (the unit of published LM1B numbers) and
  returns the unigram baselines of the datasets that define one."""
  for split, result in results.items():
    try:
      counts = data.eval_word_counts(config.data, split)
    except NotImplementedError:
      break
    result['word_perplexity'] = data.word_perplexity(result['loss'], counts)
  unigram = {}
  for split in results:
    try:
      unigram[split] = data.unigram_baseline(config.data, split=split)
    except (NotImplementedError, AttributeError):
      break
  return unigram


def _fmt(result):
  return ', '.join(f'{k} {v:.4f}' for k, v in result.items() if k != 'tokens')


def print_summary(config, step, final, unigram, progress_write=print):
  """Held-out metrics beside the unigram baseline, as a small table on stdout."""
  lines = [
    f'== {config.model.task} / {config.model.attention.kind} / {config.data.name} '
    f'after {step} steps ==',
  ]
  if config.model.task == 'encoder':
    lines.append(f'{"":18s}{"split":>12s}{"hidden mse":>12s}{"cosine":>10s}{"sentence cos":>14s}')
    for split, result in final.items():
      lines.append(
        f'{"vs teacher":18s}{split:>12s}{result["loss"]:12.5f}{result["cosine"]:10.4f}'
        f'{result.get("sentence_cosine", float("nan")):14.4f}'
      )
    for line in lines:
      progress_write(line)
    return
  lines.append(f'{"":18s}{"split":>12s}{"loss":>10s}{"accuracy":>10s}{"perplexity":>12s}')
  for split, result in final.items():
    lines.append(
      f'{"model":18s}{split:>12s}{result["loss"]:10.4f}{result["accuracy"]:10.4f}'
      f'{result["perplexity"]:12.3f}'
      + (f'   bits/dim {result["bits_per_dim"]:.4f}' if 'bits_per_dim' in result else '')
      + (
        f'   per-word perplexity {result["word_perplexity"]:.2f}'
        if 'word_perplexity' in result
        else ''
      )
    )
    if split in unigram:
      base = unigram[split]
      acc = base.get('accuracy')
      acc = f'{acc:10.4f}' if acc is not None else f'{"-":>10s}'
      lines.append(
        f'{"unigram baseline":18s}{split:>12s}{base["cross_entropy"]:10.4f}{acc}'
        f'{base["perplexity"]:12.3f}'
      )
  for line in lines:
    progress_write(line)
