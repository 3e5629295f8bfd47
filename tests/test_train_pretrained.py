"""train.py on imported checkpoints: `init_from=gguf:PATH | hf:DIR` through the ordinary
loop (architecture from the checkpoint, the model's own tokenizer for the data,
distillation from the softmax original, checkpoints and resume), on tiny random Llama
checkpoints written here (tests/test_convert_llama.py's writers)."""

import json
import os

import jax
import numpy as np
import pytest
from test_convert_llama import TINY, tiny_hf_tensors, write_gguf, write_hf

from conftest import ROOT, run_script
from performer.training import build, checkpoints, config_utils, train_lib

WORDS = ('ab', 'a', 'cab', 'bad', 'dab', 'zap', 'yak', 'max', 'jazz', 'quiz')


@pytest.fixture(scope='module')
def tiny_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('pretrained')
  tensors = tiny_hf_tensors()
  gguf_path = write_gguf(folder / 'tiny.gguf', tensors)
  hf_dir = write_hf(folder / 'hf', tensors)
  rng = np.random.default_rng(0)
  lines = [' '.join(rng.choice(WORDS, rng.integers(4, 12))) for _ in range(400)]
  text = folder / 'corpus.txt'
  text.write_text('\n'.join(lines) + '\n')
  return {'gguf': gguf_path, 'hf': hf_dir, 'text': str(text)}


def config_for(files, source, **overrides):
  items = {
    'model.family': 'llama',
    'model.task': 'causal_lm',
    'model.positions': 'rotary',
    'model.vocab_size': 0,
    'model.num_layers': 0,
    'model.num_heads': 0,
    'model.emb_dim': 0,
    'model.mlp_dim': 0,
    'model.max_len': 0,
    'model.attention.kind': 'favor_softmax',
    'model.attention.num_features': 16,
    'data.name': 'text',
    'data.path': files['text'],
    'data.tokenizer': f'gguf:{files["gguf"]}',
    'data.seq_len': 16,
    'train.init_from': source,
    'train.num_steps': 4,
    'train.checkpoint_every': 2,
    'train.eval_every': 0,
    'train.eval_batches': 1,
    'train.redraw_every': 0,
    **overrides,
  }
  config = config_utils.load_config(
    os.path.join(ROOT, 'configs', 'tiny.py'), [f'{k}={v}' for k, v in items.items()]
  )
  return config_utils.validate(config)


def flat(tree):
  return {k: np.asarray(v) for k, v in checkpoints.flatten(jax.device_get(tree)).items()}


def test_gguf_fine_tunes_with_distillation_and_resumes(tiny_files, tmp_path):
  source = f'gguf:{tiny_files["gguf"]}'
  config = config_for(tiny_files, source, **{'train.distill_from': source})
  resolved, vocab = build.resolve_config(config)
  assert (resolved.model.num_layers, resolved.model.num_kv_heads) == (2, 2)
  assert resolved.model.rope_theta == TINY.rope_theta and vocab.size == 64
  straight = train_lib.train_and_evaluate(config, str(tmp_path / 'straight'), progress=False)
  report = json.load(open(tmp_path / 'straight' / 'init_from.json'))
  assert len(report['loaded']) == 3 + 9 * 2 and report['expected_missing'] == []  # + head
  # The run's config.json describes the model alone: eval and sampling need nothing else.
  saved = json.load(open(tmp_path / 'straight' / 'config.json'))
  assert saved['model']['num_heads'] == 4 and saved['model']['family'] == 'llama'

  half = config_for(tiny_files, source, **{'train.distill_from': source, 'train.num_steps': 2})
  train_lib.train_and_evaluate(half, str(tmp_path / 'resumed'), progress=False)
  resumed = train_lib.train_and_evaluate(config, str(tmp_path / 'resumed'), progress=False)
  assert resumed['init_report'] is None  # resumed from its own checkpoint, not init_from
  for name, value in flat(straight['params']).items():
    np.testing.assert_array_equal(flat(resumed['params'])[name], value, err_msg=name)
  assert np.isfinite(straight['final']['validation']['loss'])
  # sample.py decodes the fine-tuned Llama-family run from its workdir alone.
  sampled = run_script(
    [
      'sample.py',
      f'--workdir={tmp_path / "straight"}',
      '--prompt=ab a',
      '--temperature=0',
      '--max_new_tokens=6',
    ]
  )
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  assert sampled.stdout.startswith('ab a')


@pytest.mark.slow
def test_hf_directory_fine_tunes_into_a_learned_feature_map(tiny_files, tmp_path):
  """hf:DIR (safetensors + config.json) into Hedgehog: its maps are reported as
  expected-missing and trained."""
  config = config_for(
    tiny_files,
    f'hf:{tiny_files["hf"]}',
    **{'model.attention.kind': 'hedgehog', 'train.num_steps': 2},
  )
  result = train_lib.train_and_evaluate(config, str(tmp_path / 'hf'), progress=False)
  report = result['init_report']
  assert report['expected_missing'] and all('feature_map' in n for n in report['expected_missing'])
  assert result['step'] == 2


def test_a_mismatched_family_or_size_is_one_line(tiny_files, tmp_path):
  source = f'gguf:{tiny_files["gguf"]}'
  with pytest.raises(config_utils.ConfigError, match="family: 'transformer'.*'llama' checkpoint"):
    build.resolve_config(config_for(tiny_files, source, **{'model.family': 'transformer'}))
  with pytest.raises(config_utils.ConfigError, match='num_layers: 3, but .* has 2'):
    build.resolve_config(config_for(tiny_files, source, **{'model.num_layers': 3}))
  garbage = tmp_path / 'garbage.gguf'
  garbage.write_bytes(b'\x00' * 64)
  result = run_script(
    [
      'train.py',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path / "w"}',
      '--config.model.family=llama',
      f'--config.train.init_from=gguf:{garbage}',
    ]
  )
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr
  assert lines == [lines[-1]] and 'garbage.gguf' in lines[-1] and 'GGUF' in lines[-1]
