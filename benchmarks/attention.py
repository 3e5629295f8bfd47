"""Attention forward+backward time and peak memory against sequence length.

    python benchmarks/attention.py                      # full table, 1k..32k
    python benchmarks/attention.py --lengths 4096 --json out.json
    python benchmarks/attention.py --dtype bfloat16 --softmax_impl cudnn  # GPU
    python benchmarks/attention.py --lengths 4096 --modes causal prefill --kinds \
      hedgehog:window=64 hedgehog:window=64,sinks=4 hedgehog:window=64,sinks=4,sparse_cache=256
    python benchmarks/attention.py --lengths 256 512 1024 2048 --plot attention.png

Every kind in ``attention.KINDS`` plus the per-step scan reference
('favor_softmax/scan'), causal and bidirectional; a kind may carry attention
options, ``kind:name=value,...`` (a hybrid's window, sinks, sparse cache). Mode
'prefill' times a causal prefill from an empty decoding state instead (forward
only; with a sparse cache, its chunks in order). Each row gives the time of
one forward+backward pass (the backward against a fixed random cotangent,
as a downstream layer supplies it, for every kind alike), XLA's peak memory for it, achieved GFLOP/s as a
fraction of a same-shaped plain matmul measured in the same run, and ratios
to exact softmax, to 'identity' (the dummy-attention lower bound) and to
'favor_softmax' (the target for FAVOR++ and FAVOR#: within 1.3x). Kinds with
running statistics run as in eval (the causal case reads stored statistics;
a train step adds an O(L d) moment update).
Cases whose memory or predicted time exceed the limits are skipped, with the
reason in the table. --plot draws time and peak memory against length, log-log,
one line per kind, 'identity' dashed as the floor. The design notes' targets
(docs/design.md section 6; 2-core CPU, batch 1, 8 heads, head_dim 64, m=256,
L=4096): bidirectional favor_softmax >= 15x faster than exact, causal >= 8x.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from performer import attention  # noqa: E402

SCAN = 'favor_softmax/scan'


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--lengths', type=int, nargs='+', default=[1024, 2048, 4096, 8192, 16384, 32768])
  p.add_argument(
    '--kinds',
    nargs='+',
    default=list(attention.KINDS) + [SCAN],
    help='kinds, each optionally with attention options: kind:name=value,...',
  )
  p.add_argument(
    '--modes',
    nargs='+',
    default=['bidirectional', 'causal'],
    choices=['bidirectional', 'causal', 'prefill'],
  )
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--head_dim', type=int, default=64)
  p.add_argument('--num_features', type=int, default=256)
  p.add_argument('--chunk_size', type=int, default=128)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--softmax_impl', default=None, choices=[None, 'xla', 'cudnn'])
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument(
    '--max_seconds', type=float, default=20.0, help='skip a case predicted to take longer per call'
  )
  p.add_argument('--max_memory_gb', type=float, default=12.0)
  p.add_argument('--json', default=None, help='write results here')
  p.add_argument('--plot', default=None, help='draw time and memory against length (PNG)')
  return p.parse_args(argv)


def parse_kind(spec):
  """'kind' or 'kind:name=value,...' -> (kind, {name: value}); values are Python
  literals (ints, floats, True/False) or else strings."""
  kind, _, rest = spec.partition(':')
  options = {}
  for item in filter(None, rest.split(',')):
    name, _, value = item.partition('=')
    try:
      options[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[name] = value
  return kind, options


def make_attend(kind, args):
  options = dict(
    num_features=args.num_features, chunk_size=args.chunk_size, implementation=args.softmax_impl
  )
  if kind == SCAN:
    return attention.get_attention('favor_softmax', causal_impl='scan', **options)
  kind, extra = parse_kind(kind)
  return attention.get_attention(kind, **options, **extra)


def forward_backward(attend, causal, features):
  """(q, k, v, ct) -> gradients of <attend(q, k, v), ct>: the backward pass with a fixed
  random cotangent, what a downstream layer supplies. (Differentiating sum(out**2) instead
  makes XLA:CPU's exact-softmax backward ~1.4x slower than a realistic one at L=4096,
  which flattered every linear kind's ratio.)"""

  def grads(q, k, v, ct):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, causal=causal, projection=features), q, k, v)
    return vjp(ct.astype(out.dtype))

  return jax.jit(grads)


def prefill(attend, features, max_length):
  """(q, k, v, ct) -> the outputs of a causal prefill from an empty state (ct unused)."""

  def run(q, k, v, ct):
    del ct
    b, _, h, d = q.shape
    state = attend.init_state(b, h, d, v.shape[-1], projection=features, max_length=max_length)
    return attend.prefill(state, q, k, v, projection=features)[0]

  return jax.jit(run)


def run_case(kind, mode, length, args, predicted):
  causal = mode != 'bidirectional'
  row = {'kind': kind, 'mode': mode, 'length': length}
  if predicted is not None and predicted > args.max_seconds:
    row['skipped'] = f'predicted {predicted:.0f}s > --max_seconds'
    return row
  dtype = jnp.dtype(args.dtype)
  shape = (args.batch, length, args.heads, args.head_dim)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(kk, shape, dtype) for kk in keys[:3])
  ct = jax.random.normal(jax.random.fold_in(keys[3], 1), shape, jnp.float32)
  attend = make_attend(kind, args)
  features = attend.make_projection(keys[3], args.head_dim)
  if mode == 'prefill':
    fn = prefill(attend, features, length)
  else:
    fn = forward_backward(attend, causal, features)
  compiled, peak, flops = common.compile_stats(fn, q, k, v, ct)
  row['peak_mb'] = None if peak is None else peak / 2**20
  if peak is not None and peak > args.max_memory_gb * 2**30:
    row['skipped'] = f'needs {peak / 2**30:.1f} GB > --max_memory_gb'
    return row
  seconds = common.time_call(compiled, q, k, v, ct, repeats=args.repeats)
  row.update(ms=seconds * 1e3, gflops=flops / seconds / 1e9 if flops else None)
  return row


def add_ratios(rows, matmul_rate):
  by_key = {(r['kind'], r['mode'], r['length']): r for r in rows}
  for r in rows:
    if 'ms' not in r:
      continue
    soft = by_key.get(('softmax', r['mode'], r['length']), {}).get('ms')
    ident = by_key.get(('identity', r['mode'], r['length']), {}).get('ms')
    r['speedup_vs_softmax'] = soft / r['ms'] if soft else None
    r['x_identity'] = r['ms'] / ident if ident else None
    favor = by_key.get(('favor_softmax', r['mode'], r['length']), {}).get('ms')
    r['x_favor'] = r['ms'] / favor if favor else None
    if r.get('gflops'):
      r['matmul_fraction'] = r['gflops'] / matmul_rate


def main(argv=None):
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  rows_per_head = args.batch * min(args.lengths)
  matmul_rate = common.matmul_gflops(
    rows_per_head * args.heads, args.head_dim, args.num_features, dtype
  )
  print(f'# {common.machine_info()}')
  print(
    f'# plain matmul [{rows_per_head * args.heads}x{args.head_dim}] @ '
    f'[{args.head_dim}x{args.num_features}] {args.dtype}: '
    f'{matmul_rate:.1f} GFLOP/s'
  )
  rows = []
  for mode in args.modes:
    causal = mode == 'causal'
    for kind in args.kinds:
      if kind == SCAN and not causal:
        continue
      if mode == 'bidirectional' and parse_kind(kind)[1].get('sparse_cache'):
        continue  # a causal decoding cache
      base = parse_kind(kind)[0]
      last = None  # (length, ms) of the previous size, to predict the next
      for length in sorted(args.lengths):
        predicted = None
        if last is not None:
          growth = 4.0 if base == 'softmax' else 2.0
          predicted = (
            last[1] / 1e3 * growth * (length / last[0] / 2) ** (2 if base == 'softmax' else 1)
          )
        try:
          row = run_case(kind, mode, length, args, predicted)
        except Exception as error:  # pylint: disable=broad-except
          row = common.failed_row({'kind': kind, 'mode': mode, 'length': length}, error)
        rows.append(row)
        if 'ms' in row:
          last = (length, row['ms'])
        print(
          f'  {mode:13s} {kind:18s} L={length:6d} '
          + (f'{row["ms"]:9.1f} ms' if 'ms' in row else row['skipped']),
          file=sys.stderr,
          flush=True,
        )
  add_ratios(rows, matmul_rate)
  columns = [
    ('mode', 'mode', None),
    ('kind', 'kind', None),
    ('length', 'L', '{:d}'),
    ('ms', 'ms (prefill: fwd)' if 'prefill' in args.modes else 'fwd+bwd ms', '{:.1f}'),
    ('peak_mb', 'peak MB', '{:.0f}'),
    ('speedup_vs_softmax', 'vs softmax', '{:.1f}x'),
    ('x_identity', '/ identity', '{:.1f}x'),
    ('x_favor', '/ favor_softmax', '{:.2f}x'),
    ('gflops', 'GFLOP/s', '{:.1f}'),
    ('matmul_fraction', 'of matmul', '{:.0%}'),
    ('skipped', 'note', None),
  ]
  print(common.format_table(rows, columns))
  if args.json:
    common.write_json(
      args.json,
      {
        'machine': common.machine_info(),
        'args': vars(args),
        'matmul_gflops': matmul_rate,
        'rows': rows,
      },
    )
  if args.plot:
    plot(
      rows,
      args.plot,
      title=f'{args.heads} heads, head_dim {args.head_dim}, '
      f'm={args.num_features}, batch {args.batch}, {args.dtype}',
    )
  return rows


def plot(rows, path, title=''):
  """Time and peak memory against length, log-log: one column per mode, every kind a
  line, 'identity' (the dummy-attention floor) dashed black. Skipped cases are absent from
  the time panel; their memory, known from compilation, is drawn."""
  from performer import plot as figures  # pylint: disable=g-import-not-at-top

  plt = figures._pyplot()  # pylint: disable=protected-access
  modes = list(dict.fromkeys(r['mode'] for r in rows))
  fig, axes = plt.subplots(2, len(modes), figsize=(5.5 * len(modes), 7.5), squeeze=False)
  for column, mode in enumerate(modes):
    kinds = list(dict.fromkeys(r['kind'] for r in rows if r['mode'] == mode))
    for row_index, (key, label) in enumerate((('ms', 'fwd+bwd ms'), ('peak_mb', 'peak MB'))):
      ax = axes[row_index, column]
      for kind in kinds:
        points = [(r['length'], r[key]) for r in rows if r['mode'] == mode and r['kind'] == kind]
        points = [(n, v) for n, v in points if v is not None]
        if not points:
          continue
        style = dict(color='black', linestyle='--', linewidth=2) if kind == 'identity' else {}
        name = 'identity (dummy attention)' if kind == 'identity' else kind
        ax.plot(*zip(*points), marker='o', markersize=3, label=name, **style)
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_xlabel('sequence length L')
      ax.set_ylabel(label)
      ax.set_title(f'{mode}: {label}', fontsize=10)
      ax.grid(True, which='both', alpha=0.3)
  axes[0, -1].legend(fontsize=7, loc='upper left')
  fig.suptitle(f'attention forward + backward against length ({title})', fontsize=10)
  fig.tight_layout()
  figures.save(fig, path)
  plt.close(fig)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
