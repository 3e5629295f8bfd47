"""Training loop tests: every attention kind learns, eval is deterministic, gradient
accumulation equals one big batch, features are redrawn exactly on schedule, and the MLM
masking follows BERT's 80/10/10 rule. All on the tiny config (seconds each)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import kind_params, run_script, tiny_config
from performer import attention, data, tasks
from performer.training import build, checkpoints, config_utils, optim, sharding, train_lib


def _fixed_batch(config, split='train'):
  it = data.build_dataset(config.data, split=split, batch_size=config.train.batch_size, seed=0)
  return next(it)


def _train_fixed(config, num_steps):
  """Runs the jitted train step `num_steps` times on one fixed batch; returns losses."""
  run = build.setup(config)
  st = run.model
  state = st.train_state(0, jax.jit(run.tx.init)(st.params))
  batch = sharding.global_batch(_fixed_batch(run.config), run.batch_sharding)
  losses = []
  for _ in range(num_steps):
    state, m = run.train_fn(state, batch, run.keys['train'])
    losses.append(float(m['loss']))
  return losses, state, run


@pytest.mark.parametrize('kind', kind_params(attention.KINDS))
def test_every_kind_learns(kind):
  config = tiny_config(
    model__attention__kind=kind,
    train__schedule='constant',
    train__learning_rate=1e-2,
    train__warmup_steps=0,
    data__seq_len=32,
    model__max_len=32,
    model__num_layers=1,
  )
  losses, _, _ = _train_fixed(config, 12)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.8 * losses[0], (kind, losses)


@pytest.mark.slow
def test_bfloat16_compute_learns():
  config = tiny_config(
    model__dtype='bfloat16',
    train__schedule='constant',
    train__learning_rate=1e-2,
    train__warmup_steps=0,
    data__seq_len=32,
    model__max_len=32,
    model__num_layers=1,
  )
  losses, state, _ = _train_fixed(config, 10)
  assert losses[-1] < 0.8 * losses[0], losses
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # master weights


@pytest.mark.slow
def test_mlm_learns():
  config = tiny_config(
    model__task='mlm',
    train__schedule='constant',
    train__learning_rate=1e-2,
    train__warmup_steps=0,
    data__seq_len=32,
    model__max_len=32,
    model__num_layers=1,
  )
  losses, _, _ = _train_fixed(config, 12)
  assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_image_ar_learns_and_reports_bits_per_dim():
  """The image head on stand-in tokens (protein ids < 256) shaped as a 4x8x1 'image'."""
  config = tiny_config(
    model__task='image_ar',
    model__vocab_size=256,
    model__image_shape='(4,8,1)',
    model__max_len=32,
    data__seq_len=32,
    model__num_layers=1,
    train__schedule='constant',
    train__warmup_steps=0,
    train__learning_rate=1e-2,
  )
  losses, state, run = _train_fixed(config, 8)
  assert losses[-1] < 0.8 * losses[0], losses
  result = train_lib.evaluate(
    run.eval_fn,
    state,
    run.config,
    'validation',
    num_batches=1,
    batch_sharding=run.batch_sharding,
    eval_key=run.keys['eval'],
  )
  assert result['bits_per_dim'] == pytest.approx(result['loss'] / np.log(2))


def test_train_and_evaluate_writes_outputs(tmp_path):
  config = tiny_config(
    train__num_steps=6,
    train__log_every=3,
    train__eval_every=3,
    train__checkpoint_every=2,
    train__keep_checkpoints=2,
  )
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 6
  for split in ('validation', 'test'):
    assert set(result['final'][split]) >= {'loss', 'accuracy', 'perplexity'}
    assert result['unigram'][split]['perplexity'] > 1
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows if r['split'] == 'train'] == [3, 6]
  assert any(r['split'] == 'validation' for r in rows)
  assert {'steps_per_sec', 'tokens_per_sec', 'grad_norm', 'learning_rate'} <= set(rows[0])
  assert json.load(open(tmp_path / 'config.json'))['model']['vocab_size'] == 29
  assert os.listdir(tmp_path / 'tensorboard')
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '6']  # keep the last 2
  # eval.py's path: the stored params and features give exactly the final numbers again.
  again = train_lib.evaluate_checkpoint(config, str(tmp_path))
  assert again['step'] == 6 and again['final'] == result['final']
  # eval.py itself: the table once on stdout, and no library chatter on stderr.
  proc = run_script(['eval.py', '--config=configs/tiny.py', f'--workdir={tmp_path}'], timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count('after 6 steps ==') == 1, proc.stdout
  assert f'{result["final"]["test"]["loss"]:10.4f}' in proc.stdout
  assert proc.stderr.strip() == '', proc.stderr


def test_time_limit_stops_early_evaluates_and_saves(tmp_path):
  """train.time_limit_minutes: the step that crosses the limit is the last; the run then
  logs, checkpoints and evaluates as at num_steps, and the schedule still spans num_steps."""
  config = tiny_config(
    train__num_steps=1000,
    train__time_limit_minutes=1e-6,
    train__warmup_steps=100,
    train__log_every=50,
    train__eval_every=1,
    train__checkpoint_every=50,
  )
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 1
  assert set(result['final']['validation']) >= {'loss', 'perplexity'}
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['split'], r['step']) for r in rows] == [
    ('train', 1),
    ('final_validation', 1),
    ('final_test', 1),
  ]
  assert os.listdir(tmp_path / 'checkpoints') == ['1']
  # Restarted: it resumes at step 1 with a fresh limit and runs one more step, at the
  # rate of the schedule over num_steps (warmup 1/100 of the way up after one step).
  again = train_lib.train_and_evaluate(config, str(tmp_path))
  assert again['step'] == 2
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  (second,) = [r for r in rows if r['split'] == 'train' and r['step'] == 2]
  assert second['learning_rate'] == pytest.approx(config.train.learning_rate / 100)
  with pytest.raises(Exception, match='time_limit_minutes'):
    config_utils.validate(tiny_config(train__time_limit_minutes=-1))


@pytest.mark.parametrize('task', ['causal_lm', 'mlm'])
def test_eval_is_deterministic(task):
  config = tiny_config(model__task=task, model__dropout_rate=0.1)
  run = build.setup(config)
  st = run.model
  kwargs = dict(batch_sharding=run.batch_sharding, eval_key=run.keys['eval'], num_batches=2)
  state = st.train_state()
  first = train_lib.evaluate(run.eval_fn, state, run.config, 'validation', **kwargs)
  second = train_lib.evaluate(run.eval_fn, state, run.config, 'validation', **kwargs)
  assert first == second
  assert first['tokens'] > 0 and 0 <= first['accuracy'] <= 1
  assert first['perplexity'] == pytest.approx(np.exp(first['loss']))


@pytest.mark.slow
def test_grad_accumulation_equals_big_batch():
  """MLM is the strict case: masks are drawn once for the whole batch, then split."""
  task = 'mlm'
  results = []
  for accum in (1, 4):
    config = tiny_config(
      model__task=task,
      train__grad_accum_steps=accum,
      train__batch_size=8,
      data__seq_len=32,
      model__max_len=32,
      model__num_layers=1,
    )
    losses, state, _ = _train_fixed(config, 3)
    results.append((losses, jax.tree.leaves(state.params)))
  (loss1, p1), (loss4, p4) = results
  np.testing.assert_allclose(loss1, loss4, rtol=1e-5)
  for a, b in zip(p1, p4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_redraw_schedule(tmp_path):
  """Features change before steps 3 and 6 only, to redraw(seed, step) exactly."""
  config = tiny_config(
    train__num_steps=7,
    train__redraw_every=3,
    train__checkpoint_every=1,
    train__keep_checkpoints=10,
    train__eval_every=0,
    data__seq_len=32,
    model__max_len=32,
  )
  train_lib.train_and_evaluate(config, str(tmp_path))
  run = build.setup(config)
  initial = run.model.projections
  manager = checkpoints.make_manager(str(tmp_path), 10)
  sh = run.model.shardings['projections']
  feats = {}
  for step in range(1, 8):
    trees, _ = checkpoints.restore_step(
      manager, step, {'projections': initial}, {'projections': sh}
    )
    feats[step] = checkpoints.flatten(trees['projections'])
  manager.close()
  init_flat = {k: np.asarray(v) for k, v in checkpoints.flatten(initial).items()}
  assert init_flat, 'favor_softmax must have random features'

  def same(a, b):
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)

  # Checkpoint s holds the features used by step s-1.
  assert same(feats[1], init_flat) and same(feats[3], init_flat)
  assert not same(feats[4], feats[3])
  assert same(feats[4], feats[5]) and same(feats[5], feats[6])
  assert not same(feats[7], feats[6])
  expected = checkpoints.flatten(run.redraw_fn(initial, train_lib.redraw_key(0, 3)))
  assert same(feats[4], expected)
  assert [s for s in range(10) if train_lib.should_redraw(s, 3)] == [3, 6, 9]
  assert not any(train_lib.should_redraw(s, 0) for s in range(10))


def test_mlm_masking_rule():
  config = tiny_config(model__task='mlm')
  batch = {k: jnp.asarray(v) for k, v in _fixed_batch(config).items()}
  batch = {k: jnp.tile(v, (16, 1)) for k, v in batch.items()}  # 64 rows: enough statistics
  vocab = data.vocab_for(config.data)
  special = (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.mask_id)
  inputs, targets, picked = tasks.mlm_targets(
    batch,
    jax.random.key(0),
    rate=0.15,
    mask_id=vocab.mask_id,
    special_ids=special,
    vocab_size=vocab.size,
  )
  tokens, real = np.asarray(batch['tokens']), np.asarray(batch['mask'])
  inputs, picked = np.asarray(inputs), np.asarray(picked)
  np.testing.assert_array_equal(np.asarray(targets), tokens)
  is_special = np.isin(tokens, special)
  assert not picked[~real | is_special].any()
  assert 0.12 < picked.sum() / (real & ~is_special).sum() < 0.18
  assert np.array_equal(inputs[~picked], tokens[~picked])
  frac_mask = np.mean(inputs[picked] == vocab.mask_id)
  frac_kept = np.mean(inputs[picked] == tokens[picked])
  assert 0.75 < frac_mask < 0.85 and 0.06 < frac_kept < 0.16
  assert not np.isin(inputs[picked & (inputs != vocab.mask_id)], special).any()
  again = tasks.mlm_targets(
    batch,
    jax.random.key(0),
    rate=0.15,
    mask_id=vocab.mask_id,
    special_ids=special,
    vocab_size=vocab.size,
  )
  np.testing.assert_array_equal(np.asarray(again[0]), inputs)
  # Eval: the same positions, every one of them MASK.
  ev_inputs, _, ev_picked = tasks.mlm_targets(
    batch,
    jax.random.key(0),
    rate=0.15,
    mask_id=vocab.mask_id,
    special_ids=special,
    vocab_size=vocab.size,
    mask_all=True,
  )
  np.testing.assert_array_equal(np.asarray(ev_picked), picked)
  assert np.all(np.asarray(ev_inputs)[picked] == vocab.mask_id)


def test_causal_targets_respect_segments():
  batch = {
    'tokens': jnp.array([[1, 5, 6, 2, 1, 7, 2, 0]]),
    'mask': jnp.array([[1, 1, 1, 1, 1, 1, 1, 0]], bool),
    'segment_ids': jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]]),
  }
  _, targets, weights = tasks.causal_targets(batch)
  np.testing.assert_array_equal(np.asarray(targets)[0, :6], [5, 6, 2, 1, 7, 2])
  np.testing.assert_array_equal(np.asarray(weights)[0], [1, 1, 1, 0, 1, 1, 0, 0])


def test_schedule_warmup_then_cosine():
  config = tiny_config(train__num_steps=100, train__warmup_steps=10, train__learning_rate=1.0)
  schedule = optim.make_schedule(config.train)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(55)) == pytest.approx(0.5, abs=1e-6)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)
  config = tiny_config(train__schedule='constant', train__warmup_steps=10, train__learning_rate=1.0)
  schedule = optim.make_schedule(config.train)
  assert float(schedule(5)) == pytest.approx(0.5) and float(schedule(50)) == 1.0


def test_segment_ids_reach_the_model_only_for_packed_rows():
  """Unpacked rows hold one sequence: their segment ids would only send attention down
  the slower packed-segment path, so the loop drops them."""
  from ml_collections import ConfigDict

  batch = {
    'tokens': np.zeros((1, 4), np.int32),
    'mask': np.ones((1, 4), bool),
    'segment_ids': np.ones((1, 4), np.int32),
  }
  assert 'segment_ids' not in train_lib.model_batch(batch, ConfigDict({'pack': False}))
  assert 'segment_ids' in train_lib.model_batch(batch, ConfigDict({'pack': True}))


@pytest.mark.slow
def test_running_statistics_update_and_survive_resume(tmp_path):
  """FAVOR++ moments are updated by every train step (not reset: the step returns them),
  frozen by eval, checkpointed, and a run resumed from step 2 ends with the same
  statistics and parameters as a run straight to step 4."""
  args = dict(
    model__attention__kind='favor_plus_plus',
    train__num_steps=4,
    train__checkpoint_every=2,
    train__eval_every=0,
    train__log_every=2,
    train__schedule='constant',
    data__seq_len=32,
    model__max_len=32,
  )
  straight = train_lib.train_and_evaluate(tiny_config(**args), str(tmp_path / 'straight'))
  half = train_lib.train_and_evaluate(
    tiny_config(**{**args, 'train__num_steps': 2}), str(tmp_path / 'resumed')
  )
  resumed = train_lib.train_and_evaluate(tiny_config(**args), str(tmp_path / 'resumed'))

  def stats(result):
    return {k: np.asarray(v) for k, v in checkpoints.flatten(result['stats']).items()}

  two, four = stats(half), stats(resumed)
  assert len(two) == 4  # moments and weight of each of the 2 layers
  weights = sorted(k for k in two if k.endswith('weight'))
  for k in weights:  # 1 - 0.99^steps: exactly two, then four updates
    np.testing.assert_allclose(two[k], 1 - 0.99**2, rtol=1e-5)
    np.testing.assert_allclose(four[k], 1 - 0.99**4, rtol=1e-5)
  assert not any(np.array_equal(two[k], four[k]) for k in two)
  for k, v in stats(straight).items():
    np.testing.assert_array_equal(four[k], v, err_msg=k)
  for a, b in zip(jax.tree.leaves(resumed['params']), jax.tree.leaves(straight['params'])):
    np.testing.assert_array_equal(a, b)
  # Eval reads the checkpointed statistics and does not move them.
  again = train_lib.evaluate_checkpoint(
    tiny_config(**args), str(tmp_path / 'resumed'), splits=('validation',)
  )
  assert again['final']['validation'] == resumed['final']['validation']
