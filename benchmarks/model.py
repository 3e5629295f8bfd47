"""Full-model training step time and peak memory against sequence length.

    python benchmarks/model.py                     # 6 layers, d=512, L = 1k..32k (12-15 min, 2 cores)
    python benchmarks/model.py --quick             # tiny model, 2 lengths (tests, notebooks)
    python benchmarks/model.py --lengths 8192 --kinds favor_softmax identity --modes causal
    python benchmarks/model.py --dtype bfloat16 --json model.json

One row per (mode, kind, L): the time of one jitted training step --
forward, backward and the AdamW update, exactly the step `train.py` runs
(`performer.training.steps.make_step_fns`, parameters and optimizer state
donated) -- and XLA's peak memory for that compiled step (arguments +
outputs + temporaries - donated aliases; see benchmarks/common.py). Modes:
'causal' is the causal LM (task causal_lm) and 'bidirectional' the masked LM
(task mlm, BERT masking inside the step). The batch is what the protein
pipeline gives an unpacked full-length row, as the training loop passes it to
the model: one sequence of L random residues, mask all True, no segment_ids
(those are passed only for packed rows; see train_lib.model_batch).

The default model is the paper's speed-test size: 6 layers, d=512, 8 heads
(head_dim 64), MLP 2048, m=256 features, batch 1, float32, learned
positions. Kinds: softmax (exact), favor_softmax (FAVOR+), favor_relu
(generalized attention) and identity (attention returns v: the "dummy"
lower bound the paper calls optimal). Printed ratios: step time / identity's
and softmax's / this kind's at the same L, memory growth peak(L) / peak(L/4)
for each kind, and "FLOPs / id": XLA's FLOP count of the step over
identity's, the time ratio a kind would reach if it ran at identity's
arithmetic efficiency. Identity does no q or k projection (XLA drops them as
dead code), so that floor includes them.

Time is the best of --repeats steps after a warm-up step; a step slower than
--single_call_above seconds is timed by its first call alone. That call
carries one-time costs (first touch of the step's buffers: 5 s of the
causal Performer's 17 s first step at L=8192), so keep the threshold far
above the steps you report. A case whose
time, predicted from the previous length (linear in L, quadratic for
softmax), exceeds --max_seconds is not run, but it is still compiled, so
its peak memory is in the table (unless that alone exceeds --max_memory_gb).
Design-notes targets (docs/design.md, section 6): Performer step <= 1.3x identity at L=8192;
memory from L to 4L grows <= 4.4x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))
import common  # noqa: E402
from configs import base as base_config  # noqa: E402
from performer import data, tasks  # noqa: E402
from performer.training import build, optim, restore, sharding  # noqa: E402
from performer.training import steps as steps_lib  # noqa: E402

KINDS = ('softmax', 'favor_softmax', 'favor_relu', 'identity')
MODES = {'causal': 'causal_lm', 'bidirectional': 'mlm'}


def add_model_args(p):
  """The model-size flags, shared with benchmarks/context_parallel.py."""
  p.add_argument('--layers', type=int, default=6)
  p.add_argument('--emb_dim', type=int, default=512)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--mlp_dim', type=int, default=2048)
  p.add_argument('--num_features', type=int, default=256)
  p.add_argument('--chunk_size', type=int, default=128)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
    '--lengths', type=int, nargs='+', default=None, help='default 1024 .. 32768 (--quick: 256 1024)'
  )
  p.add_argument('--kinds', nargs='+', default=list(KINDS))
  p.add_argument('--modes', nargs='+', default=list(MODES), choices=list(MODES))
  add_model_args(p)
  p.add_argument(
    '--repeats',
    type=int,
    default=2,
    help='timed steps per case after one warm-up step (best is reported)',
  )
  p.add_argument(
    '--single_call_above',
    type=float,
    default=40.0,
    help='time a step slower than this (seconds) by its first call only',
  )
  p.add_argument(
    '--max_seconds',
    type=float,
    default=30.0,
    help='do not time a case predicted to take longer per step',
  )
  p.add_argument(
    '--max_memory_gb',
    type=float,
    default=10.0,
    help='do not run a case whose compiled step needs more',
  )
  p.add_argument(
    '--quick', action='store_true', help='tiny model, lengths 256 and 1024: a smoke test'
  )
  p.add_argument('--json', default=None, help='write results here')
  args = p.parse_args(argv)
  if args.lengths is None:
    args.lengths = [256, 1024] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]
  if args.quick:
    args.layers, args.emb_dim, args.heads, args.mlp_dim = 1, 64, 2, 128
    args.num_features, args.chunk_size = 32, 64
  if unknown := sorted(set(args.kinds) - set(KINDS)):
    p.error(f'unknown kinds {unknown}; choose from {", ".join(KINDS)}')
  return args


def make_config(kind, mode, length, args):
  """The run config (base schema) of one case: model size, task, attention."""
  config = base_config.get_config()
  m = config.model
  m.task = MODES[mode]
  m.num_layers, m.num_heads = args.layers, args.heads
  m.emb_dim, m.mlp_dim, m.max_len = args.emb_dim, args.mlp_dim, length
  m.dropout_rate, m.positions, m.dtype = 0.0, 'learned', args.dtype
  m.attention.kind = kind
  m.attention.num_features = args.num_features
  m.attention.chunk_size = args.chunk_size
  config.data.name = 'protein_sample'
  config.data.seq_len = length
  config.model.vocab_size = data.vocab_for(config.data).size
  config.train.batch_size = args.batch
  return config


def build_step(config, mesh=None):
  """(jitted train step, its arguments) for `config`.

  The step is `make_step_fns`' train step with a donated state: the program
  `train.py` runs. On one device (no `mesh`) it is built without sharding
  annotations, which are no-ops there; with a `mesh` the batch is laid out as the
  training loop lays it out and the state is replicated (benchmarks/context_parallel.py).
  """
  # The model as training builds it (no compilation: the values are random anyway).
  model = build.create_state(config, mesh or restore.one_device_mesh(), init='eager')
  tx, schedule = optim.make_optimizer(config.train)
  vocab = data.vocab_for(config.data)
  task = tasks.for_run(config.model, config.train, vocab)
  placement = {}
  if mesh is not None:
    placement = dict(
      batch_sharding=sharding.batch_sharding(mesh), replicated=sharding.replicated(mesh)
    )
  train_fn, _ = steps_lib.make_step_fns(
    model.graphdef, tx, schedule, task, config.train, use_dropout=False, **placement
  )
  rng = np.random.RandomState(0)
  shape = (config.train.batch_size, config.data.seq_len)
  low = vocab.num_special if hasattr(vocab, 'num_special') else 0
  batch = {
    'tokens': rng.randint(low, low + 20, shape).astype(np.int32),
    'mask': np.ones(shape, bool),
  }
  state = model.train_state(1, tx.init(model.params))
  key = jax.random.key(0)
  if mesh is None:
    return train_fn, (state, jax.tree.map(jnp.asarray, batch), key)
  put = lambda tree: jax.device_put(tree, placement['replicated'])
  return train_fn, (put(state), sharding.global_batch(batch, placement['batch_sharding']), put(key))


def time_steps(compiled, args, repeats, single_above):
  """Best wall time of `repeats` steps after a warm-up step; the updated
  state is fed back (the input state is donated).

  A step whose first (warm-up) call takes longer than `single_above` seconds
  is timed by that call alone, which includes one-time costs (see the module
  docstring): only for steps long enough that repeating them is too costly.
  Returns (seconds, number of calls).
  """
  state, *rest = args
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, *rest)
    jax.block_until_ready((state.params, metrics))
    times.append(time.perf_counter() - start)
    if times[0] > single_above:
      return times[0], 1
  return min(times[1:]), len(times)


def run_case(kind, mode, length, args, predicted=None):
  """Measures one case; returns its table row (with 'skipped' when not timed)."""
  row = {'mode': mode, 'kind': kind, 'length': length}
  fn, fn_args = build_step(make_config(kind, mode, length, args))
  start = time.perf_counter()
  compiled, peak, flops = common.compile_stats(fn, *fn_args)
  row['compile_s'] = time.perf_counter() - start
  row['peak_mb'] = None if peak is None else peak / 2**20
  row['gflop'] = flops / 1e9 if flops else None
  if peak is not None and peak > args.max_memory_gb * 2**30:
    row['skipped'] = f'needs {peak / 2**30:.1f} GB > --max_memory_gb'
  elif predicted is not None and predicted > args.max_seconds:
    row['skipped'] = f'predicted {predicted:.0f}s > --max_seconds'
  else:
    seconds, row['calls'] = time_steps(compiled, fn_args, args.repeats, args.single_call_above)
    row['ms'] = seconds * 1e3
    row['gflops'] = flops / seconds / 1e9 if flops else None
  return row


def predict(kind, last, length):
  """Seconds per step at `length`, extrapolated from (length, ms) `last`."""
  if last is None:
    return None
  power = 2 if kind == 'softmax' else 1
  return last[1] / 1e3 * (length / last[0]) ** power


def add_ratios(rows):
  """x_identity, vs_softmax (same mode and L) and memory growth from L/4."""
  by_key = {(r['mode'], r['kind'], r['length']): r for r in rows}
  for r in rows:
    ident_row = by_key.get((r['mode'], 'identity', r['length']), {})
    ident = ident_row.get('ms')
    if r.get('gflop') and ident_row.get('gflop'):
      r['flops_x_identity'] = r['gflop'] / ident_row['gflop']
    soft = by_key.get((r['mode'], 'softmax', r['length']), {}).get('ms')
    if 'ms' in r:
      r['x_identity'] = r['ms'] / ident if ident else None
      r['vs_softmax'] = soft / r['ms'] if soft else None
    quarter = by_key.get((r['mode'], r['kind'], r['length'] // 4), {}).get('peak_mb')
    if quarter and r.get('peak_mb') and r['length'] % 4 == 0:
      r['mem_growth_4x'] = r['peak_mb'] / quarter
  return rows


def run(args, log=None):
  """Every (mode, kind, length) case of `args`; returns rows with ratios."""
  log = log or (lambda text: print(text, file=sys.stderr, flush=True))
  rows = []
  for mode in args.modes:
    for kind in args.kinds:
      last = None
      for length in sorted(args.lengths):
        try:
          row = run_case(kind, mode, length, args, predict(kind, last, length))
        except Exception as error:  # pylint: disable=broad-except
          row = common.failed_row({'mode': mode, 'kind': kind, 'length': length}, error)
        rows.append(row)
        if 'ms' in row:
          last = (length, row['ms'])
        log(
          f'  {mode:13s} {kind:14s} L={length:6d} '
          f'peak {row.get("peak_mb") or 0:8.0f} MB  '
          + (f'{row["ms"]:9.1f} ms' if 'ms' in row else row['skipped'])
        )
  return add_ratios(rows)


COLUMNS = [
  ('mode', 'mode', None),
  ('kind', 'kind', None),
  ('length', 'L', '{:d}'),
  ('ms', 'step ms', '{:.0f}'),
  ('x_identity', '/ identity', '{:.2f}x'),
  ('flops_x_identity', 'FLOPs / id', '{:.2f}x'),
  ('vs_softmax', 'softmax /', '{:.1f}x'),
  ('peak_mb', 'peak MB', '{:.0f}'),
  ('mem_growth_4x', 'mem / L/4', '{:.2f}x'),
  ('gflops', 'GFLOP/s', '{:.1f}'),
  ('skipped', 'note', None),
]


def summary_lines(rows, length=8192):
  """The docs/design.md section 6 checks as text: step time vs identity at
  `length` (target <= 1.3x) and worst memory growth L -> 4L (target <= 4.4x)."""
  lines = []
  for r in rows:
    if r['length'] == length and r['kind'].startswith('favor') and r.get('x_identity'):
      flops = (
        f"; XLA's FLOP count alone is {r['flops_x_identity']:.2f}x"
        if r.get('flops_x_identity')
        else ''
      )
      lines.append(
        f'{r["mode"]} {r["kind"]}: step time at L={length} = '
        f'{r["x_identity"]:.2f}x identity (target <= 1.3x{flops})'
      )
  for mode in sorted({r['mode'] for r in rows}):
    for kind in sorted({r['kind'] for r in rows}):
      growth = [
        r['mem_growth_4x']
        for r in rows
        if r['mode'] == mode and r['kind'] == kind and r.get('mem_growth_4x')
      ]
      if growth:
        target = '  (target <= 4.4x)' if kind.startswith('favor') else ''
        lines.append(f'{mode} {kind}: memory growth L -> 4L at most {max(growth):.2f}x{target}')
  return lines


def main(argv=None):
  args = parse_args(argv)
  info = common.machine_info()
  print(f'# {info}')
  print(
    f'# model: {args.layers} layers, d={args.emb_dim}, {args.heads} heads, '
    f'mlp {args.mlp_dim}, m={args.num_features}, batch {args.batch}, '
    f'{args.dtype}; train step = fwd + bwd + AdamW',
    flush=True,
  )
  rows = run(args)
  print(common.format_table(rows, COLUMNS))
  lines = summary_lines(rows)
  for line in lines:
    print(line)
  if args.json:
    common.write_json(
      args.json, {'machine': info, 'args': vars(args), 'rows': rows, 'summary': lines}
    )
  return rows


if __name__ == '__main__':
  main()
