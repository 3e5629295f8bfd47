"""Config tests: every config file loads (and validates, unless its dataset is not in
performer.data yet), overrides are typed, and train.py turns each kind of bad config
into ONE line on stderr with exit status 2."""

import glob
import os

import ml_collections
import pytest

from conftest import ROOT, run_script
from performer import data
from performer.training import config_utils

CONFIG_FILES = sorted(
  p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py')) if not p.endswith('__init__.py')
)


def test_expected_config_files_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
  assert {
    'base',
    'tiny',
    'default',
    'lm1b_transformer',
    'lm1b_performer',
    'imagenet64_performer',
  } <= names
  for attn in ('transformer', 'performer_softmax', 'performer_relu'):
    for direction in ('uni', 'bi'):
      assert f'protein_{attn}_{direction}' in names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_validates(path):
  config = config_utils.load_config(path)
  assert isinstance(config, ml_collections.ConfigDict)
  with pytest.raises(AttributeError):
    config.train.not_a_key = 1  # locked
  doc = open(path).read()
  assert 'python train.py --config=configs/' in doc or path.endswith('base.py')
  if config.data.name in data.NAMES:
    config_utils.validate(config)
  else:  # e.g. lm1b / imagenet64 before their pipelines exist: a clear one-line error
    with pytest.raises(config_utils.ConfigError, match='config.data.name'):
      config_utils.validate(config)


def test_protein_variants_differ_only_where_named():
  load = lambda n: config_utils.load_config(os.path.join(ROOT, 'configs', f'{n}.py'))
  default = load('protein_performer_softmax_uni')
  assert load('default').to_dict() == default.to_dict()
  transformer = load('protein_transformer_uni')
  assert transformer.model.attention.kind == 'softmax'
  assert transformer.model.emb_dim == default.model.emb_dim
  assert transformer.train.num_steps == default.train.num_steps
  assert load('protein_performer_relu_bi').model.task == 'mlm'
  assert load('protein_performer_relu_bi').model.attention.kind == 'favor_relu'


def test_overrides_are_typed():
  path = os.path.join(ROOT, 'configs', 'tiny.py')
  config = config_utils.load_config(
    path,
    [
      'train.learning_rate=1',
      'config.train.batch_size=8',
      'model.attention.orthogonal=false',
      'model.image_shape=(8,8,3)',
      'data.path=/x.faa',
    ],
  )
  assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
  assert config.train.batch_size == 8 and config.model.attention.orthogonal is False
  assert config.model.image_shape == (8, 8, 3) and config.data.path == '/x.faa'
  for bad, key in [
    ('train.batch_size=abc', 'config.train.batch_size'),
    ('train.batch_sze=8', 'config.train.batch_sze'),
    ('nope.x=1', 'config.nope'),
    ('model.attention=3', 'config.model.attention'),
    ('model.attention.orthogonal=maybe', 'config.model.attention.orthogonal'),
  ]:
    with pytest.raises(config_utils.ConfigError, match=key.replace('.', r'\.')) as e:
      config_utils.load_config(path, [bad])
    assert '\n' not in str(e.value)


def test_variant_file_cannot_add_keys(tmp_path):
  path = tmp_path / 'typo.py'
  path.write_text(
    'from configs import base\n\ndef get_config():\n'
    '  config = base.get_config()\n  config.train.batch_sze = 8\n  return config\n'
  )
  with pytest.raises(config_utils.ConfigError, match="'batch_sze'.*did you mean 'batch_size'"):
    config_utils.load_config(str(path))


@pytest.mark.parametrize(
  'override,key',
  [
    ('--config.train.no_such_key=1', 'config.train.no_such_key'),
    ('--config.train.batch_size=eight', 'config.train.batch_size'),
    ('--config.model.attention.kind=fancy', 'config.model.attention.kind'),
    ('--config.model.task=translation', 'config.model.task'),
    ('--config.model.attention.stats_decay=1.5', 'stats_decay'),
  ],
)
def test_train_py_bad_config_is_one_line_exit_2(override, key, tmp_path):
  proc = run_script(
    ['train.py', '--config=configs/tiny.py', f'--workdir={tmp_path}', override], timeout=120
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert key in lines[0] and 'Traceback' not in proc.stderr
  assert not os.listdir(tmp_path)  # nothing was built or written


def test_train_py_unavailable_dataset_fails_fast(tmp_path):
  """lm1b is not prepared on a test machine: the data module's message, as one line."""
  proc = run_script(
    [
      'train.py',
      '--config=configs/lm1b_transformer.py',
      f'--workdir={tmp_path}',
      f'--config.data.data_dir={tmp_path}/none',
    ],
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith('W')]
  assert len(lines) == 1 and 'lm1b' in lines[0] and 'Traceback' not in proc.stderr, proc.stderr


def test_eval_py_without_checkpoint_is_one_line_exit_2(tmp_path):
  proc = run_script(['eval.py', '--config=configs/tiny.py', f'--workdir={tmp_path}'], timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith('W')]
  assert len(lines) == 1 and 'checkpoint' in lines[0], proc.stderr


@pytest.mark.parametrize(
  'name,family,sizes',
  [
    pytest.param('smollm2_favor', 'llama', (30, 9, 3, 576, 49152), marks=pytest.mark.slow),
    ('minilm_favor', 'bert', (6, 12, 12, 384, 30522)),
  ],
)
def test_pretrained_configs_take_their_architecture_from_the_checkpoint(name, family, sizes):
  """The imported-model configs leave the sizes at 0; resolving reads them from the real
  GGUF / HF checkpoint (metadata only) and the data tokenizer is the model's own."""
  from performer.training import build

  config = config_utils.validate(
    config_utils.load_config(os.path.join(ROOT, 'configs', f'{name}.py'))
  )
  assert config.model.num_layers == 0 and config.data.tokenizer == config.train.init_from
  resolved, vocab = build.resolve_config(config)
  m = resolved.model
  assert m.family == family
  assert (
    m.num_layers,
    m.num_heads,
    m.num_kv_heads or m.num_heads,
    m.emb_dim,
    m.vocab_size,
  ) == sizes
  assert vocab.size == m.vocab_size
  assert len(vocab.encode('The capital of France is')) >= 5
  # distill_from and the tokenizer follow init_from; overriding them touches nothing else.
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  moved = config_utils.load_config(path, ['train.init_from=hf:/elsewhere'])
  assert moved.train.distill_from == moved.data.tokenizer == 'hf:/elsewhere'
  off = config_utils.load_config(path, ['train.distill_from='])
  assert off.train.distill_from == '' and off.train.init_from == config.train.init_from
