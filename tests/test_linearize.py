"""Linearizing an imported checkpoint through train.py: the attention-transfer stage
(only the attention modules' own parameters train, against the softmax teacher's
layers) and a LoRA stage that leaves every frozen weight bitwise unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_pretrained import config_for, flat, tiny_files  # noqa: F401

from performer import models
from performer.convert import attention_transfer
from performer.training import build, config_utils, train_lib


def layer_mse(config, params, projections, stats, rest):
  """Mean per-token transfer loss of the student trees against the teacher, on a
  fixed random batch."""
  run = build.setup(config)
  teacher = nnx.merge(run.teacher.graphdef, *run.teacher.trees)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 16), 0, config.model.vocab_size or 64)
  _, captured = models.capture_intermediates(teacher, tokens, deterministic=True)
  student = nnx.merge(run.model.graphdef, params, projections, stats, rest)
  sums = attention_transfer.transfer_sums(student, captured, None, None)
  return float(sums['loss_sum'] / sums['weight_sum'])


# Hedgehog trains its maps and gains; FAVOR+ has no feature parameters, only the gains.
@pytest.mark.parametrize(
  'kind,window,ratio',
  [('hedgehog', 4, 0.97), pytest.param('favor_softmax', 4, 0.995, marks=pytest.mark.slow)],
)
def test_attention_transfer_lowers_layer_mse_and_trains_only_the_attention(
  tiny_files,  # noqa: F811
  tmp_path,
  kind,
  window,
  ratio,
):
  source = f'gguf:{tiny_files["gguf"]}'
  overrides = {
    'model.attention.kind': kind,
    'model.attention.window': window,
    'train.distill_from': source,
    'train.transfer_steps': 10,
    'train.transfer_learning_rate': 0.05,
    'train.num_steps': 10,
    'train.checkpoint_every': 0,
  }
  trained = train_lib.train_and_evaluate(
    config_for(tiny_files, source, **overrides), str(tmp_path / 'a'), progress=False
  )
  still = config_for(tiny_files, source, **{**overrides, 'train.transfer_learning_rate': 0.0})
  before = train_lib.train_and_evaluate(still, str(tmp_path / 'b'), progress=False)
  trees = lambda r: (r['params'], r['projections'], r['stats'], r['rest'])
  config = config_for(tiny_files, source, **overrides)
  mse_before, mse_after = layer_mse(config, *trees(before)), layer_mse(config, *trees(trained))
  assert mse_after < ratio * mse_before, (mse_before, mse_after)
  changed = {
    k
    for k, v in flat(trained['params']).items()
    if not np.array_equal(v, flat(before['params'])[k])
  }
  assert changed and all(('feature_map' in k or 'window_log_gain' in k) for k in changed), changed


def test_transfer_needs_a_teacher(tiny_files):  # noqa: F811
  """A config check: it fails in config_utils.validate, before anything is built."""
  source = f'gguf:{tiny_files["gguf"]}'
  with pytest.raises(config_utils.ConfigError, match='distill_from'):
    config_for(tiny_files, source, **{'train.transfer_steps': 2})


def test_lora_stage_leaves_frozen_weights_bitwise_unchanged(tiny_files, tmp_path):  # noqa: F811
  source = f'gguf:{tiny_files["gguf"]}'
  overrides = {
    'model.lora_rank': 2,
    'model.attention.window': 4,
    'train.trainable': 'lora',
    'train.distill_from': source,
    'train.learning_rate': 0.05,
    'train.warmup_steps': 0,
    'train.checkpoint_every': 0,
    'train.num_steps': 3,
  }
  config = config_for(tiny_files, source, **overrides)
  result = train_lib.train_and_evaluate(config, str(tmp_path / 'lora'), progress=False)
  run = build.setup(config)
  initial, _ = build.load_pretrained_params(source, run.model)
  start, end = flat(initial), flat(result['params'])
  lora = {k for k in end if '.lora_' in k or 'lora' in k.split('.')[-1]}
  assert lora and any(not np.array_equal(start[k], end[k]) for k in lora)
  for k in set(end) - lora:
    np.testing.assert_array_equal(start[k], end[k], err_msg=k)
  with pytest.raises(Exception, match='lora_rank'):
    build.setup(config_for(tiny_files, source, **{'train.trainable': 'lora'}))
  assert jnp.all(jnp.isfinite(jnp.asarray(list(end.values())[0])))


def test_sentence_cosine_pools_each_sentence_and_packed_segment():
  from performer import tasks

  rng = np.random.default_rng(0)
  teacher = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
  seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  mask = seg > 0
  same = tasks.sentence_sums(teacher, teacher, mask, seg)
  assert float(same['sentences']) == 3 and np.isclose(float(same['sentence_cosine_sum']), 3.0)
  # Flipping one token's sign in sentence (0, 2) lowers only that sentence's cosine.
  student = teacher.at[0, 3].multiply(-1.0)
  sums = tasks.sentence_sums(student, teacher, mask, seg)
  pooled = lambda x: np.asarray(x[0, 3:5]).sum(0)
  want = np.dot(pooled(student), pooled(teacher)) / (
    np.linalg.norm(pooled(student)) * np.linalg.norm(pooled(teacher))
  )
  np.testing.assert_allclose(float(sums['sentence_cosine_sum']), 2.0 + want, rtol=1e-5)


@pytest.mark.slow
def test_conversion_resumes_across_the_stage_boundary(tiny_files, tmp_path):  # noqa: F811
  """Stopped after step 3 (stage 2's first step) and resumed, a two-stage conversion
  ends bitwise where the straight run does."""
  source = f'gguf:{tiny_files["gguf"]}'
  overrides = {
    'model.attention.kind': 'hedgehog',
    'model.attention.window': 4,
    'model.lora_rank': 2,
    'train.trainable': 'lora',
    'train.distill_from': source,
    'train.transfer_steps': 2,
    'train.schedule': 'constant',
    'train.checkpoint_every': 1,
  }
  straight = train_lib.train_and_evaluate(
    config_for(tiny_files, source, **{**overrides, 'train.num_steps': 4}),
    str(tmp_path / 'straight'),
    progress=False,
  )
  workdir = str(tmp_path / 'resumed')
  train_lib.train_and_evaluate(
    config_for(tiny_files, source, **{**overrides, 'train.num_steps': 3}), workdir, progress=False
  )
  resumed = train_lib.train_and_evaluate(
    config_for(tiny_files, source, **{**overrides, 'train.num_steps': 4}), workdir, progress=False
  )
  want, got = flat(straight['params']), flat(resumed['params'])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
