"""eval.py --text_file: per-token perplexity of any text file with the model's own
tokenizer, beside the softmax original (--teacher), on the tiny random Llama GGUF of
test_train_pretrained.py fine-tuned for 2 steps. The printed numbers are checked against
direct forward passes over the same windows, one window at a time: the state training
ended with (not eval.py's restore of its checkpoint), and for the original the float64
numpy Llama of test_convert_llama.py."""

import math
import re

import numpy as np
import pytest
from flax import nnx
from test_convert_llama import TINY, jit_forward, numpy_llama, tiny_hf_tensors
from test_train_pretrained import WORDS, config_for, tiny_files  # noqa: F401 (fixture)

from conftest import ROOT, run_script, tiny_config
from performer import data, errors, models
from performer.training import restore, text_eval, train_lib

MAX_TOKENS = 100  # 6 full windows of 16 and one of 4: a padded, masked last window

# eval.py reads its --config from a file: this one rebuilds the training config exactly.
CONFIG_PY = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
from test_train_pretrained import config_for
def get_config():
  return config_for({files!r}, {source!r}, **{{'train.num_steps': 2}})
"""


@pytest.fixture(scope='module')
def run(tiny_files, tmp_path_factory):  # noqa: F811
  folder = tmp_path_factory.mktemp('text_eval')
  source = f'gguf:{tiny_files["gguf"]}'
  files = {k: str(v) for k, v in tiny_files.items()}
  workdir = str(folder / 'w')
  config = config_for(files, source, **{'train.num_steps': 2})
  trained = train_lib.train_and_evaluate(config, workdir, progress=False)
  config_py = folder / 'text_eval_config.py'
  config_py.write_text(
    CONFIG_PY.format(tests=f'{ROOT}/tests', root=ROOT, files=files, source=source)
  )
  rng = np.random.default_rng(1)
  text = folder / 'notes.txt'
  text.write_text('\n'.join(' '.join(rng.choice(WORDS, 8)) for _ in range(12)) + '\n')
  return {'workdir': workdir, 'config': str(config_py), 'text': str(text), 'trained': trained}


def windows_loss(forward, ids, seq_len):
  """Mean next-token loss over non-overlapping windows, in float64, each window on its own."""
  total, count = 0.0, 0
  for start in range(0, len(ids), seq_len):
    w = np.asarray(ids[start : start + seq_len])
    logits = np.asarray(forward(w), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    total -= float(np.sum(logp[np.arange(len(w) - 1), w[1:]]))
    count += len(w) - 1
  return total / count, count


def test_text_file_perplexity_matches_a_direct_forward_pass(run):
  proc = run_script(
    [
      'eval.py',
      f'--config={run["config"]}',
      f'--workdir={run["workdir"]}',
      f'--text_file={run["text"]}',
      f'--max_tokens={MAX_TOKENS}',
      '--teacher',
    ],
    timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert 'not scored' in lines[0] and f'{MAX_TOKENS} tokens in 7 windows of 16' in lines[0]
  rows = [re.fullmatch(r'(.+?)\s+(\d+)\s+([-\d.]+)\s+([\d.]+)', line) for line in lines[2:]]
  assert len(rows) == 2 and all(rows), proc.stdout
  assert rows[0][1] == 'favor_softmax, step 2' and rows[1][1] == 'softmax original gguf:tiny.gguf'

  config = restore.run_config(run['workdir'])
  ids = data.vocab_for(config.data).encode(open(run['text']).read())
  assert len(ids) > MAX_TOKENS and data.vocab_for(config.data).bos_id is None
  ids = ids[:MAX_TOKENS]
  # The state training ended with (= its last checkpoint), not eval.py's restore of it.
  build = lambda: models.build_model(config.model, rngs=nnx.Rngs(0))
  graphdef = models.split(nnx.eval_shape(build))[0]
  trained = [run['trained'][k] for k in ('params', 'projections', 'stats', 'rest')]
  fine_tuned = jit_forward(nnx.merge(graphdef, *trained))
  tensors = tiny_hf_tensors()
  references = [
    windows_loss(lambda w: fine_tuned(w[None])[0], ids, 16),
    windows_loss(lambda w: numpy_llama(tensors, TINY, w), ids, 16),
  ]
  for row, (loss, count) in zip(rows, references):
    assert int(row[2]) == count == 6 * 15 + 3
    assert float(row[3]) == pytest.approx(loss, abs=2e-5)
    assert float(row[4]) == pytest.approx(math.exp(loss), rel=2e-5)
  assert abs(references[0][0] - references[1][0]) > 1e-3  # two different models


def test_a_missing_text_file_is_one_line(run, tmp_path):
  proc = run_script(
    [
      'eval.py',
      f'--config={run["config"]}',
      f'--workdir={run["workdir"]}',
      f'--text_file={tmp_path / "nope.txt"}',
    ],
    timeout=120,
  )
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith('error: --text_file not found') and 'nope.txt' in lines[0]


def test_bad_files_and_configs_are_user_errors(tmp_path):
  latin1, empty = tmp_path / 'latin1.txt', tmp_path / 'empty.txt'
  latin1.write_bytes(b'fine\ncaf\xe9\n')
  empty.write_text(' \n\n')
  with pytest.raises(errors.DataFileError, match=r'latin1.txt:2: not UTF-8'):
    text_eval.read_text(str(latin1))
  with pytest.raises(errors.DataFileError, match='empty'):
    text_eval.read_text(str(empty))
  with pytest.raises(errors.UserInputError, match='names no original model'):
    text_eval.score_text(tiny_config(), str(tmp_path), str(empty), teacher=True)
  with pytest.raises(errors.UserInputError, match="task is 'mlm'"):
    text_eval.score_text(tiny_config(model__task='mlm'), str(tmp_path), str(empty))
