"""Smoke tests of the benchmark scripts: they run, and their tables and JSON hold together.

Tiny sizes only: the numbers are meaningless here, the plumbing is what is tested. Compiling
a training step dominates, so each run compiles few: benchmarks/model.py's bidirectional
mode runs here with softmax and identity, its causal mode with favor_softmax and identity in
notebook 2's quick test (tests/test_notebooks.py). benchmarks/decode.py --quick is tested in
test_decode.py. benchmarks/mqar.py --quick trains softmax and favor_softmax without a window
here (~15 s); its windowed rows are checked without training.
"""

import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, run_script

sys.path.insert(0, ROOT)
from flax import nnx  # noqa: E402  pylint: disable=g-import-not-at-top

from benchmarks import model as model_bench  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import mqar, mqar_data  # noqa: E402  pylint: disable=g-import-not-at-top
from performer import models  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.slow
def test_model_benchmark_quick(tmp_path):
  path = tmp_path / 'model.json'
  proc = run_script(
    [
      'benchmarks/model.py',
      '--quick',
      '--modes',
      'bidirectional',
      '--kinds',
      'softmax',
      'identity',
      '--lengths',
      '128',
      '512',
      '--json',
      str(path),
    ],
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(path.read_text())
  rows = {(r['kind'], r['length']): r for r in out['rows']}
  assert set(rows) == {(k, n) for k in ('softmax', 'identity') for n in (128, 512)}
  for (kind, length), row in rows.items():
    assert row['mode'] == 'bidirectional'
    assert row['ms'] > 0 and row['peak_mb'] > 0, row
    assert row['x_identity'] > 0 and row['vs_softmax'] > 0
    if kind == 'identity':
      assert row['x_identity'] == 1.0
    else:
      assert row['vs_softmax'] == 1.0
  for kind in ('softmax', 'identity'):
    assert rows[kind, 512]['mem_growth_4x'] > 1.0
  assert out['args']['layers'] == 1  # --quick shrinks the model
  assert 'step ms' in proc.stdout and '/ identity' in proc.stdout
  assert 'memory growth L -> 4L' in proc.stdout


def test_model_benchmark_skips_by_prediction_and_memory():
  """A case over the time limit is compiled (memory reported) but not run; one over the
  memory limit is neither run nor timed."""
  args = model_bench.parse_args(['--quick', '--max_memory_gb', '1e-6'])
  row = model_bench.run_case('identity', 'causal', 64, args)
  assert 'ms' not in row and 'max_memory_gb' in row['skipped'] and row['peak_mb'] > 0
  args = model_bench.parse_args(['--quick', '--max_seconds', '1'])
  row = model_bench.run_case('identity', 'causal', 64, args, predicted=5.0)
  assert 'ms' not in row and 'max_seconds' in row['skipped'] and row['peak_mb'] > 0


def test_model_benchmark_ratios_and_summary():
  rows = [
    {'mode': 'causal', 'kind': k, 'length': n, 'ms': ms, 'peak_mb': mb}
    for k, n, ms, mb in (
      ('identity', 2048, 10.0, 100.0),
      ('identity', 8192, 40.0, 380.0),
      ('favor_softmax', 2048, 12.0, 110.0),
      ('favor_softmax', 8192, 48.0, 440.0),
      ('softmax', 2048, 30.0, 400.0),
    )
  ]
  rows.append(
    {'mode': 'causal', 'kind': 'softmax', 'length': 8192, 'peak_mb': 6400.0, 'skipped': 'needs'}
  )
  model_bench.add_ratios(rows)
  by = {(r['kind'], r['length']): r for r in rows}
  assert by['favor_softmax', 8192]['x_identity'] == 1.2
  assert by['favor_softmax', 2048]['vs_softmax'] == 2.5
  assert by['softmax', 8192]['mem_growth_4x'] == 16.0  # memory even when not timed
  assert by['favor_softmax', 8192]['mem_growth_4x'] == 4.0
  text = '\n'.join(model_bench.summary_lines(rows))
  assert 'favor_softmax: step time at L=8192 = 1.20x identity' in text
  assert 'causal softmax: memory growth L -> 4L at most 16.00x' in text


def test_model_benchmark_rejects_unknown_kind(capsys):
  try:
    model_bench.parse_args(['--kinds', 'favor_nope'])
  except SystemExit as e:
    assert e.code == 2
  assert 'favor_nope' in capsys.readouterr().err


def test_attention_benchmark_runs(tmp_path):
  path = tmp_path / 'attention.json'
  proc = run_script(
    [
      'benchmarks/attention.py',
      '--lengths',
      '256',
      '--kinds',
      'softmax',
      'favor_softmax',
      'identity',
      '--repeats',
      '1',
      '--json',
      str(path),
      '--plot',
      str(tmp_path / 'attention.png'),
    ],
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / 'attention.png').read_bytes()[:4] == b'\x89PNG'  # time and memory vs L
  rows = json.loads(path.read_text())['rows']
  assert {(r['mode'], r['kind']) for r in rows} == {
    (m, k) for m in ('bidirectional', 'causal') for k in ('softmax', 'favor_softmax', 'identity')
  }
  assert all(r['ms'] > 0 and r['peak_mb'] > 0 for r in rows)
  assert os.path.getsize(path) > 0


def test_attention_benchmark_options_and_prefill(tmp_path):
  """Kinds with options (a hybrid, + sinks, + sparse cache) in causal and prefill modes;
  the cache is causal-only, so its bidirectional row is left out."""
  path = tmp_path / 'hybrid.json'
  kinds = ['hedgehog:window=8', 'hedgehog:window=8,sinks=2', 'hedgehog:window=8,sparse_cache=4']
  args = ['--lengths', '32', '--heads', '2', '--head_dim', '8', '--chunk_size', '8']
  args += ['--modes', 'causal', 'prefill', 'bidirectional', '--repeats', '1', '--kinds', *kinds]
  proc = run_script(['benchmarks/attention.py', *args, '--json', str(path)], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(path.read_text())['rows']
  want = {(m, k) for m in ('causal', 'prefill') for k in kinds} | {
    ('bidirectional', k) for k in kinds[:2]
  }
  assert {(r['mode'], r['kind']) for r in rows} == want
  assert all(r['ms'] > 0 for r in rows), rows


@pytest.mark.slow
def test_context_parallel_benchmark_quick(tmp_path):
  """Per-device memory falls with seq, and the state traffic does not grow with L."""
  path = tmp_path / 'cp.json'
  proc = run_script(
    ['benchmarks/context_parallel.py', '--quick', '--lengths', '512', '1024']
    + ['--seq', '1', '4', '--json', str(path)],
    timeout=300,
    JAX_PLATFORMS='cpu',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {(r['length'], r['seq']): r for r in json.loads(path.read_text())['rows']}
  assert set(rows) == {(512, 1), (1024, 1), (512, 4), (1024, 4)}
  for length in (512, 1024):
    assert rows[(length, 4)]['peak_mb'] < 0.6 * rows[(length, 1)]['peak_mb']
    assert rows[(length, 1)]['state_kb_per_layer'] == 0
    assert 'ms' in rows[(length, 4)] and rows[(length, 4)]['time_x_seq1'] > 0
  assert rows[(512, 4)]['state_kb_per_layer'] == rows[(1024, 4)]['state_kb_per_layer'] > 0
  assert 'state traffic KB / layer' in proc.stdout


@pytest.mark.slow
def test_pretrained_error_benchmark_on_smollm2(tmp_path):
  """Real SmolLM2 q/k: random features approximate softmax, a window cuts the error, a
  window as long as the text is softmax itself (the capture's control), and only the
  calibrated FAVOR++ picks a negative A."""
  path = tmp_path / 'error.json'
  proc = run_script(
    ['benchmarks/pretrained_error.py', '--layers', '2', '--seeds', '1', '--length', '128']
    + ['--window', '0', '32', '128', '--kinds', 'favor_softmax', 'favor_plus_plus']
    + ['--num_features', '64', '--json', str(path)],
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {(r['kind'], r['window']): r for r in json.loads(path.read_text())['rows']}
  kinds = ('favor_softmax', 'favor_plus_plus')
  assert set(rows) == {(k, w) for k in kinds for w in (0, 32, 128)}
  for kind in kinds:
    assert rows[(kind, 128)]['out_rel_err'] < 1e-6 and rows[(kind, 128)]['weights_tv'] < 1e-4
    assert 1e-3 < rows[(kind, 32)]['out_rel_err'] < rows[(kind, 0)]['out_rel_err']
    assert 1e-3 < rows[(kind, 32)]['weights_tv'] < rows[(kind, 0)]['weights_tv']
    assert len(rows[(kind, 0)]['per_layer_out_rel_err']) == 2
  assert rows[('favor_plus_plus', 0)]['a'] < 0


TINY_PROTEIN_LONG = ['data.seq_len=64', 'model.max_len=64', 'model.emb_dim=32', 'model.mlp_dim=64']
TINY_PROTEIN_LONG += ['model.attention.num_features=16', 'model.attention.chunk_size=16']


@pytest.mark.slow  # three step compilations: ~30 s of CPU even at this size
def test_protein_long_memory_mode(tmp_path, capsys):
  """The three rows (Performer, shrunk Transformer, softmax at the Performer's size) are
  compiled on real packed batches and checked against the budget; nothing is trained."""
  from benchmarks import protein_long  # pylint: disable=g-import-not-at-top

  path = tmp_path / 'protein_long.json'
  argv = ['--override', *TINY_PROTEIN_LONG, '--budget_gib', '0.004', '--json', str(path)]
  protein_long.main(argv)
  out = json.loads(path.read_text())
  rows = {r['model']: r for r in out['rows']}
  assert list(rows) == ['performer', 'transformer', 'softmax_same_size']
  assert rows['performer']['attention'] == 'favor_softmax'
  assert rows['transformer']['size'] == '2x32 (1h)'  # its own shrinking, under the override
  assert rows['softmax_same_size']['size'] == rows['performer']['size'] == '3x32 (4h)'
  for row in rows.values():
    assert row['peak_gib'] > 0 and row['params'] > 0 and 'steps' not in row
    assert row['fits'] == ('yes' if row['peak_gib'] <= 0.004 else 'NO')
  assert out['budget_gib'] == 0.004
  assert 'peak step GiB' in capsys.readouterr().out


@pytest.mark.slow
def test_protein_long_trains_both_for_the_time_limit(tmp_path):
  """--train: both trained configs stop at the (tiny) time limit, are evaluated, and a
  workdir that holds a run is refused instead of resumed."""
  from benchmarks import protein_long  # pylint: disable=g-import-not-at-top

  argv = ['--override', *TINY_PROTEIN_LONG, '--train', '--minutes', '1e-6']
  rows = protein_long.main(argv + ['--workdir', str(tmp_path)])
  by = {r['model']: r for r in rows}
  for name in ('performer', 'transformer'):
    assert by[name]['steps'] == 1 and by[name]['val_ppl'] > 1 and by[name]['wall_min'] > 0
    assert os.listdir(tmp_path / name / 'checkpoints') == ['1']
  assert 'steps' not in by['softmax_same_size']
  with pytest.raises(SystemExit, match='not empty'):
    protein_long.main(argv + ['--workdir', str(tmp_path)])


def test_mqar_data_follows_zoology():
  """Keys and values from disjoint halves, every key queried once after the pairs, the
  target its own value, queries mostly soon after the pairs (power law), one stream per seed."""
  counts = mqar_data.row_pairs([4, 16], 64)
  batch = mqar_data.mqar_batch(np.random.default_rng(0), counts, 128, 512)
  again = mqar_data.mqar_batch(np.random.default_rng(0), counts, 128, 512)
  other = mqar_data.mqar_batch(np.random.default_rng(1), counts, 128, 512)
  assert all(np.array_equal(batch[k], again[k]) for k in batch)
  assert not np.array_equal(batch['tokens'], other['tokens'])
  assert len(batch['rows']) == counts.sum()
  gaps = []
  for i, n in enumerate(counts):
    tokens, mine = batch['tokens'][i], batch['rows'] == i
    keys, values = tokens[0 : 2 * n : 2], tokens[1 : 2 * n : 2]
    assert len(set(keys)) == n and keys.min() >= 1 and keys.max() < 256 <= values.min()
    lookup = dict(zip(keys, values))
    positions = batch['positions'][mine]
    assert sorted(tokens[positions]) == sorted(keys) and positions.min() >= 2 * n
    assert all(lookup[tokens[q]] == v for q, v in zip(positions, batch['labels'][mine]))
    if n == 16:
      gaps.extend((positions - 2 * n) // 2)
  assert np.mean(gaps) < 0.8 * (128 - 32) / 4  # uniform gaps would average 23.5


def test_mqar_rejects_unknown_attention_option(capsys):
  args = mqar.parse_args(['--quick', '--attention_option', 'num_features=16'])
  assert args.options == {'num_features': 16}
  with pytest.raises(SystemExit) as e:
    mqar.parse_args(['--quick', '--attention_option', 'favor_nope=1'])
  assert e.value.code == 2 and 'favor_nope' in capsys.readouterr().err


def test_mqar_benchmark_quick(tmp_path):
  """--quick --windows 0 trains softmax and favor_softmax on tiny MQAR: softmax learns
  above chance, state sizes are those of the real decoding caches, and the table, JSON
  and plot are written. The windowed rows are checked without training."""
  path, png = tmp_path / 'mqar.json', tmp_path / 'mqar.png'
  proc = run_script(
    ['benchmarks/mqar.py', '--quick', '--windows', '0', '--json', str(path), '--plot', str(png)],
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(path.read_text())
  args, rows = out['args'], {r['kind']: r for r in out['rows']}
  assert [(r['kind'], r['window']) for r in out['rows']] == [('softmax', 0), ('favor_softmax', 0)]
  pairs, length, heads = args['pairs'], args['length'], args['heads']
  head_dim, floats = args['emb_dim'] // heads, 4
  for row in rows.values():
    assert 'skipped' not in row, row
    assert all(0.0 <= row[f'acc_{n}'] <= 1.0 for n in pairs)
    assert row['train_s'] > 0 and row['eval_queries'] == {str(n): 64 * n for n in pairs}
  chance = 2 / args['vocab']
  assert np.mean([rows['softmax'][f'acc_{n}'] for n in pairs]) > 3 * chance
  # Softmax: K and V of every position, valid flags, an index; FAVOR: S, z and the max;
  # both: the short convolution's last K - 1 inputs of q, k and v.
  conv = 3 * (args['short_conv'] - 1) * heads * head_dim * floats
  softmax = 2 * length * heads * head_dim * floats + length + 4
  assert rows['softmax']['state_bytes'] == softmax + conv
  m = mqar.NUM_FEATURES
  assert rows['favor_softmax']['state_bytes'] == heads * (m * head_dim + m + 1) * floats + conv
  header = proc.stdout.splitlines()
  assert any(all(c in line for c in ('acc 2', 'acc 4', 'state KiB', 'train s')) for line in header)
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # A window adds its ring of W raw keys and values (+ flags, position); softmax has none.
  quick = mqar.parse_args(['--quick'])
  assert quick.windows == [0, 8]
  model = models.build_model(mqar.model_dict('favor_softmax', 8, quick), rngs=nnx.Rngs(0))
  ring = 2 * 8 * heads * head_dim * floats + 8 + 4
  assert mqar.state_bytes(model, length) == rows['favor_softmax']['state_bytes'] + ring
  assert mqar.run_row('softmax', 8, quick, print)['skipped'].startswith('n/a')


def test_mqar_curriculum_is_shortest_first_with_equal_tokens():
  assert mqar_data.train_mix(['256:16', '64:4', '256:32']) == {64: [4], 256: [16, 32]}
  with pytest.raises(ValueError, match='length:pairs'):
    mqar_data.train_mix(['64-4'])
  stages = mqar_data.curriculum([64, 128, 256], 700)
  assert stages == sorted(stages) and len(stages) == 700
  assert [stages.count(n) * n for n in (64, 128, 256)] == [25600] * 3
