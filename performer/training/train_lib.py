"""`train_and_evaluate(config, workdir)`: one training loop for every task.

Shaped after Flax's examples/lm1b: build the run (`build.setup`), restore if a checkpoint
exists, loop over steps with periodic logging / eval / checkpoints, then a final
evaluation. The model lives as `nnx.split` pieces for the whole run:

  graphdef  static structure, closed over by the jitted steps
  params    nnx.Param           -> optimized, FSDP-sharded, donated to the step
                                   (feature-map parameters, attention.FeatureParam, too)
  projections  RandomProjection   -> redrawn every `train.redraw_every` steps, checkpointed
  stats     FeatureStats        -> running statistics, updated and returned by the step,
                                   frozen in eval, checkpointed
  rest      everything else     -> (dropout RNG streams) reseeded inside the step

Every random choice is a pure function of (config.seed, step): dropout, MLM masks, feature
redraws and (through the data iterator's checkpointed position) the batch order. That is
what makes a killed-and-resumed run end with bitwise the same parameters.

The workdir belongs to one run (rundir.py): training holds its lock, and resumes only under
the run's own config (schedule keys aside). SIGINT / SIGTERM finish the current step, save
a checkpoint and raise `interrupts.Interrupted` (interrupts.py).
"""

import base64
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from performer import data, models, tasks
from performer.convert import pretrained
from performer.training import build, checkpoints, interrupts, restore, rundir, sharding
from performer.training import metrics as metrics_lib

log = logging.getLogger(__name__)


def redraw_key(seed, step):
  """The key for the random projections used from `step` on (a function of seed and step only)."""
  return jax.random.fold_in(build.rng_streams(seed)['redraw'], step)


def should_redraw(step, redraw_every):
  """Features are redrawn before steps redraw_every, 2*redraw_every, ... (never at 0)."""
  return redraw_every > 0 and step > 0 and step % redraw_every == 0


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


def evaluate(eval_fn, state, config, split, *, batch_sharding, eval_key, num_batches=0, stop=None):
  """Deterministic eval of a `TrainState` (its optimizer state unused) over `num_batches`
  batches of `split` (<= 0: the whole split); None as soon as `stop()` is true."""
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
    if stop is not None and stop():
      return None
    batch = _pad_batch(batch, local_bs)
    models.check_tokens(batch['tokens'], config.model.vocab_size)
    batch = model_batch(batch, config.data)
    sums = eval_fn(
      state, sharding.global_batch(batch, batch_sharding), jax.random.fold_in(eval_key, i)
    )
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f'the {split!r} split produced no batches')
  return tasks.TASKS[config.model.task].summary(jax.device_get(totals))


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


def _initial_state(run, manager, workdir):
  """Resume from workdir, else init_from (params only), else fresh. Returns (TrainState,
  meta, init report or None).

  A checkpoint in the workdir always wins over train.init_from, so restarting a fine-tuning
  run resumes it instead of starting the fine-tuning over.
  """
  config, model = run.config, run.model
  sh = model.shardings
  items = ('params', 'opt_state', 'projections', 'stats')
  restored = restore.restore_trees(manager, model, items, move_corrupt=True)
  if restored is not None:
    step, trees, meta = restored
    log.info('resumed from %s at step %d', manager.directory, step)
    state = model.train_state(step).replace(**trees)
    return state, meta, None
  params, report = model.params, None
  if pretrained.is_pretrained(config.train.init_from):
    params, report = build.load_pretrained_params(config.train.init_from, model)
  elif config.train.init_from:
    params, report = checkpoints.load_params_by_name(
      config.train.init_from, params, sh['params'], expected_missing=model.new_params
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

  Holds the workdir's lock throughout; a run already in the workdir resumes only if
  `config` matches its config.json up to the schedule keys (else rundir.RunConfigError).
  On SIGINT / SIGTERM: saves at the current step and raises `interrupts.Interrupted`.

  Returns a dict: 'step', 'params', 'projections', 'final' ({split: metrics}), 'unigram'
  (when the data module has a baseline) and 'init_report' (with train.init_from).
  """
  sharding.maybe_initialize_distributed()  # before the lock: process 0 alone takes it
  with rundir.lock(workdir, enabled=jax.process_index() == 0), interrupts.catching() as stop:
    rundir.check_resume(build.resolve_config(config)[0], workdir)
    return _train(config, workdir, progress, stop)


def _save(manager, ts, step, train_it):
  checkpoints.save(
    manager,
    step,
    {
      'params': ts.params,
      'opt_state': ts.opt_state,
      'projections': ts.projections,
      'stats': ts.stats,
    },
    {'step': step, 'data_state': _data_state(train_it)},
  )


def _train(config, workdir, progress, stop):
  run = build.setup(config)
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
  # train.time_limit_minutes: wall time of this process's loop (steps, periodic evals,
  # checkpoints); the step that crosses it is the last. The schedule still spans num_steps.
  deadline = time.perf_counter() + 60 * tc.time_limit_minutes if tc.time_limit_minutes else None

  while step < tc.num_steps and not stop.at_step(manager, step):
    if should_redraw(step, tc.redraw_every) and jax.tree.leaves(ts.projections):
      ts = ts.replace(projections=run.redraw_fn(ts.projections, redraw_key(config.seed, step)))
    batch = next(train_it)
    models.check_tokens(batch['tokens'], config.model.vocab_size)
    batch = sharding.global_batch(model_batch(batch, config.data), run.batch_sharding)
    ts, step_metrics = run.train_fn(ts, batch, keys['train'])
    pending.append(step_metrics)
    step += 1
    bar.advance()
    last = step == tc.num_steps or (deadline is not None and time.perf_counter() >= deadline)
    if step % tc.log_every == 0 or last or stop.pending():
      host = jax.device_get(pending)
      now = time.perf_counter()
      rate = (step - last_step) / max(now - last_time, 1e-9)
      # Keys of the latest step: a window may straddle the transfer -> train switch.
      summary = {k: float(np.mean([m[k] for m in host if k in m])) for k in host[-1]}
      summary.update(steps_per_sec=rate, tokens_per_sec=rate * tokens_per_step)
      writer.write(step, 'train', summary)
      bar.set_rates(rate, rate * tokens_per_step)
      log.info(
        'step %d%s: loss %.5g%s | %.2f steps/s %.0f tokens/s',
        step,
        ' (attention transfer: layer MSE, output cosine)' if step <= tc.transfer_steps else '',
        summary['loss'],
        ''.join(
          f' {name} {summary[key]:.4f}'
          for key, name in (
            ('accuracy', 'accuracy'),
            ('cosine', 'cosine'),
            ('output_cosine', 'output cosine'),
            ('distill_loss', 'distill'),
          )
          if key in summary
        ),
        rate,
        rate * tokens_per_step,
      )
      pending, last_time, last_step = [], now, step
    if tc.eval_every and step % tc.eval_every == 0 and not last:
      result = evaluate(
        run.eval_fn,
        ts,
        config,
        'validation',
        num_batches=tc.eval_batches,
        stop=stop.pending,
        **eval_kwargs,
      )
      if result is not None:  # None: a signal came during the eval
        writer.write(step, 'validation', result)
        log.info('step %d validation: %s', step, _fmt(result))
      last_time = time.perf_counter()
    if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or last:
      _save(manager, ts, step, train_it)
    if last and step < tc.num_steps:
      log.info('step %d: train.time_limit_minutes=%g reached', step, tc.time_limit_minutes)
      break
  if stop.pending() and step not in manager.all_steps():
    _save(manager, ts, step, train_it)  # the interrupt's checkpoint, at the current step
  bar.close()
  manager.wait_until_finished()
  manager.close()

  final = {}
  for split in ('validation', 'test'):
    if not stop.pending():
      final[split] = evaluate(run.eval_fn, ts, config, split, stop=stop.pending, **eval_kwargs)
  if stop.pending():  # the checkpoint at num_steps is there; a rerun only evaluates
    writer.close()
    raise interrupts.Interrupted(stop.signum, step)
  unigram = held_out_extras(config, final)
  for split in final:
    writer.write(step, f'final_{split}', final[split])
  writer.close()
  print_summary(config, step, final, unigram, progress_write=bar.write)
  return {
    'step': step,
    'params': ts.params,
    'projections': ts.projections,
    'stats': ts.stats,
    'rest': ts.rest,
    'final': final,
    'unigram': unigram,
    'init_report': init_report,
  }


def evaluate_run(config, workdir, splits=('validation', 'test'), num_batches=0):
  """(resolved config, step, {split: metrics}) of the newest good checkpoint of `workdir`
  (params, projections, statistics): the run restored (restore.py) and the eval step alone,
  no optimizer and no train step."""
  sharding.maybe_initialize_distributed()
  config, vocab = build.resolve_config(config)
  mesh = sharding.make_mesh(config.mesh)
  build.check_batch_size(config, mesh)
  run = restore.restore(workdir, config, mesh=mesh)
  eval_fn = build.make_eval_fn(config, vocab, mesh, run.state)
  kwargs = dict(batch_sharding=sharding.batch_sharding(mesh), num_batches=num_batches)
  kwargs['eval_key'] = build.rng_streams(config.seed)['eval']
  state = run.state.train_state(run.step)
  return config, run.step, {s: evaluate(eval_fn, state, config, s, **kwargs) for s in splits}


def evaluate_checkpoint(config, workdir, splits=('validation', 'test'), num_batches=0):
  """eval.py's held-out evaluation: `evaluate_run`, with the unigram baselines, printed."""
  config, step, results = evaluate_run(config, workdir, splits, num_batches)
  unigram = held_out_extras(config, results)
  print_summary(config, step, results, unigram)
  return {'step': step, 'final': results, 'unigram': unigram}


def held_out_extras(config, results):
  """Adds per-word perplexity to text results (the unit of published LM1B numbers) and
  returns the unigram baselines of the datasets that define one; neither means anything
  for a task that predicts no tokens (an encoder's hidden states)."""
  if not tasks.TASKS[config.model.task].predicts_tokens:
    return {}
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
  lines += tasks.TASKS[config.model.task].summary_table(final, unigram)
  for line in lines:
    progress_write(line)
