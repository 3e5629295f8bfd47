"""Context parallelism: per-device memory and traffic of one causal training step
with the sequence split over `seq` devices.

    python benchmarks/context_parallel.py                 # L = 8k, 32k, 64k, 128k; seq = 1, 2, 4, 8
    python benchmarks/context_parallel.py --quick         # tiny model, 2 lengths (tests)
    python benchmarks/context_parallel.py --lengths 32768 --seq 1 8 --time_up_to 32768 --json cp.json

Runs on 8 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set here before JAX starts) unless the machine has 8 or more devices of its own.
Each case is the training step `train.py` runs (forward, backward, AdamW) for the
6-layer d=512 causal LM with FAVOR+ (m=256, chunks of 128), batch 1, on a mesh
data=1 x fsdp=1 x seq=P of the first P devices. Columns:

- peak MB / device: XLA's buffer assignment of the compiled SPMD program (one
  device's arguments + outputs + temporaries - donated aliases). Target: about
  1/P of seq=1's.
- state traffic / layer: bytes of the all-gathers (and their reduce-scatter
  transposes in the backward pass) in the compiled program, per layer: the
  per-device (S, z, M, seg) states. Target: constant in L.
- gradient all-reduce: the gradients of the parameters, which are replicated
  over `seq` (shard them with mesh.fsdp); it grows with L only through the
  learned position table [L, d].
- other traffic: every other collective (the one-token shift of the targets
  across span boundaries).
- step ms and / seq=1: wall time of one step, where the step's memory on all
  forced devices together stays under --max_memory_gb (they share this
  machine's RAM) and L <= --time_up_to. Forced CPU devices also share its cores,
  so this ratio shows the overhead, not the speedup P real devices give.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))
import model as model_bench  # noqa: E402

import common  # noqa: E402
from performer.training import sharding  # noqa: E402

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'collective-permute', 'all-to-all')
_BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 'pred': 1, 's8': 1, 'u8': 1}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--lengths', type=int, nargs='+', default=None)
  p.add_argument('--seq', type=int, nargs='+', default=[1, 2, 4, 8])
  p.add_argument('--kind', default='favor_softmax')
  model_bench.add_model_args(p)
  p.add_argument('--time_up_to', type=int, default=32768, help='time steps up to this length')
  p.add_argument(
    '--max_memory_gb', type=float, default=8.0, help='time a step only if all devices need less'
  )
  p.add_argument('--quick', action='store_true', help='tiny model, lengths 1024 and 4096')
  p.add_argument('--json', default=None, help='write results here')
  args = p.parse_args(argv)
  if args.lengths is None:
    args.lengths = [1024, 4096] if args.quick else [8192, 32768, 65536, 131072]
  if args.quick:
    args.layers, args.emb_dim, args.heads, args.mlp_dim = 2, 64, 2, 128
    args.num_features, args.chunk_size = 32, 64
  if max(args.seq) > jax.device_count():
    p.error(f'--seq {max(args.seq)} needs that many devices; JAX sees {jax.device_count()}')
  return args


def make_config(length, seq, args):
  """benchmarks/model.py's causal case, on a data=1 x fsdp=1 x seq mesh."""
  config = model_bench.make_config(args.kind, 'causal', length, args)
  config.mesh.data, config.mesh.seq = 1, seq
  return config


def collective_bytes(hlo_text):
  """{op: bytes} of the collectives in an HLO module's text (result shapes)."""
  totals = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo_text.splitlines():
    match = re.search(r'=\s*(.+?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(', line)
    if not match:
      continue
    for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', match.group(1)):
      if dtype in _BYTES:
        size = int(np.prod([int(d) for d in dims.split(',') if d])) if dims else 1
        totals[match.group(2)] += size * _BYTES[dtype]
  return totals


def run_case(length, seq, args):
  row = {'length': length, 'seq': seq}
  config = make_config(length, seq, args)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[: config.mesh.seq])
  fn, fn_args = model_bench.build_step(config, mesh)
  start = time.perf_counter()
  compiled, peak, _ = common.compile_stats(fn, *fn_args)
  row['compile_s'] = time.perf_counter() - start
  row['peak_mb'] = None if peak is None else peak / 2**20
  traffic = collective_bytes(compiled.as_text())
  state = traffic['all-gather'] + traffic['reduce-scatter']
  row['state_kb_per_layer'] = state / args.layers / 1024
  row['all_reduce_mb'] = traffic['all-reduce'] / 2**20
  row['other_bytes'] = sum(traffic.values()) - state - traffic['all-reduce']
  total_gb = (peak or 0) * seq / 2**30
  if total_gb > args.max_memory_gb:
    row['skipped'] = f'not timed: {total_gb:.1f} GB on all devices > --max_memory_gb'
  elif length <= args.time_up_to:
    state, *rest = fn_args
    times = []
    for _ in range(2):  # the first call is the warm-up
      start = time.perf_counter()
      state, metrics = fn(state, *rest)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    row['ms'] = times[-1] * 1e3
  return row


def add_ratios(rows):
  by_key = {(r['length'], r['seq']): r for r in rows}
  for r in rows:
    base = by_key.get((r['length'], 1), {})
    if r.get('peak_mb') and base.get('peak_mb'):
      r['memory_x_seq1'] = r['peak_mb'] / base['peak_mb']
    if r.get('ms') and base.get('ms'):
      r['time_x_seq1'] = r['ms'] / base['ms']
  return rows


COLUMNS = [
  ('length', 'L', '{:d}'),
  ('seq', 'seq', '{:d}'),
  ('peak_mb', 'peak MB / device', '{:.0f}'),
  ('memory_x_seq1', '/ seq=1', '{:.3f}'),
  ('state_kb_per_layer', 'state traffic KB / layer', '{:.1f}'),
  ('all_reduce_mb', 'gradient all-reduce MB', '{:.1f}'),
  ('other_bytes', 'other traffic B', '{:d}'),
  ('ms', 'step ms', '{:.0f}'),
  ('time_x_seq1', 'time / seq=1', '{:.2f}x'),
  ('skipped', 'note', None),
]


def main(argv=None):
  args = parse_args(argv)
  info = common.machine_info()
  print(f'# {info}; {jax.device_count()} devices')
  print(
    f'# causal LM {args.kind}: {args.layers} layers, d={args.emb_dim}, {args.heads} heads, '
    f'mlp {args.mlp_dim}, m={args.num_features}, chunk {args.chunk_size}, batch {args.batch}, '
    f'{args.dtype}',
    flush=True,
  )
  rows = []
  for length in args.lengths:
    for seq in args.seq:
      try:
        row = run_case(length, seq, args)
      except Exception as error:  # pylint: disable=broad-except
        row = common.failed_row({'length': length, 'seq': seq}, error)
      rows.append(row)
      print(f'  L={length:6d} seq={seq}: {row}', file=sys.stderr, flush=True)
  rows = add_ratios(rows)
  print(common.format_table(rows, COLUMNS))
  if args.json:
    common.write_json(args.json, {'machine': info, 'args': vars(args), 'rows': rows})
  return rows


if __name__ == '__main__':
  main()
