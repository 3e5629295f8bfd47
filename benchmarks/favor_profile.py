"""Where bidirectional FAVOR+'s time goes: each stage of the attention call timed alone.

    python benchmarks/favor_profile.py                    # L=4096, B1 H8 D64, m=256 (about 1 min)
    python benchmarks/favor_profile.py --length 16384 --json profile.json

The stages are the library's own functions, in the order `LinearAttention` runs them
for bidirectional FAVOR+ without segments (attention/favor_softmax.py, feature_map.py,
linear.py), each jitted alone and timed forward + backward against a fixed random
cotangent of its output (the gradient a downstream layer supplies):

1. projection: q/d^.25 and k/d^.25 times the random matrix w [m, d] (two matmuls)
   and the key's -|k|^2/2;
2. exp: phi(q) = exp(logits - row max), phi(k) = exp(logits - one shared max);
3. contractions: Z = phi(K)^T V, z = phi(K)^T 1, phi(Q) Z, phi(Q) z;
4. normaliser: num / den and the return to [B, L, H, D].

"whole" is the attention call itself. Each stage's FLOPs and bytes come from XLA's
cost analysis of its compiled program; "GFLOP/s" against the machine's plain matmul
("matmul" row, [L, 256] x [256, 256] f32) says how far a stage is from matmul speed, and
"GB/s" how close an elementwise stage is to memory speed. Stage times add up to more
than "whole" by what XLA fuses across stage boundaries.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))
import common  # noqa: E402
from performer import attention  # noqa: E402
from performer.attention import feature_map as fm  # noqa: E402
from performer.attention import linear  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--length', type=int, default=4096)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--head_dim', type=int, default=64)
  p.add_argument('--num_features', type=int, default=256)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--json', default=None, help='write results here')
  return p.parse_args(argv)


def stages(args):
  """{name: (function, example inputs)}: every stage takes and returns arrays."""
  rng = np.random.default_rng(0)
  shape = (args.batch, args.length, args.heads, args.head_dim)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
  attend = attention.get_attention('favor_softmax', num_features=args.num_features)
  w = attend.make_projection(jax.random.PRNGKey(0), args.head_dim)

  def projection(q, k):
    qs, ks = fm.scaled(q), fm.scaled(k)
    return fm.project(qs, w), fm.project(ks, w) - fm.half_sq_norm(ks)[..., None]

  def features(q_logits, k_logits):
    return fm.exp_parts(q_logits)[0], fm.exp_shared(k_logits, None)

  def contractions(qf, kw, v_heads):
    return linear.bidirectional(qf, kw, v_heads)

  def normaliser(num, den):
    return linear.normalise(num, den, 1e-6).swapaxes(1, 2)

  def whole(q, k, v):
    return attend(q, k, v, causal=False, projection=w)

  q_logits, k_logits = jax.jit(projection)(q, k)
  qf, kw = jax.jit(features)(q_logits, k_logits)
  v_heads = v.swapaxes(1, 2)
  num, den = jax.jit(contractions)(qf, kw, v_heads)
  return {
    '1 projection': (projection, (q, k)),
    '2 exp': (features, (q_logits, k_logits)),
    '3 contractions': (contractions, (qf, kw, v_heads)),
    '4 normaliser': (normaliser, (num, den)),
    'whole': (whole, (q, k, v)),
  }


def forward_backward(fn, inputs):
  """jit(inputs -> gradients of sum(fn(inputs) * fixed random cotangent))."""
  outputs = jax.eval_shape(fn, *inputs)
  keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(outputs)))
  cotangent = jax.tree.unflatten(
    jax.tree.structure(outputs),
    [jax.random.normal(key, o.shape, o.dtype) for key, o in zip(keys, jax.tree.leaves(outputs))],
  )

  def step(*xs):
    out, vjp = jax.vjp(fn, *xs)
    return out, vjp(cotangent)

  return jax.jit(step)


def measure(name, fn, inputs, repeats):
  jitted = forward_backward(fn, inputs)
  compiled = jitted.lower(*inputs).compile()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  seconds = common.time_call(compiled, *inputs, repeats=repeats)
  flops, moved = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  return {
    'stage': name,
    'ms': seconds * 1e3,
    'gflop': flops / 1e9,
    'gflops': flops / seconds / 1e9,
    'mb_moved': moved / 2**20,
    'gbps': moved / seconds / 1e9,
  }


COLUMNS = [
  ('stage', 'stage (fwd+bwd)', None),
  ('ms', 'ms', '{:.1f}'),
  ('share', 'share of stages', '{:.0%}'),
  ('gflop', 'GFLOP', '{:.2f}'),
  ('gflops', 'GFLOP/s', '{:.1f}'),
  ('mb_moved', 'MB moved', '{:.0f}'),
  ('gbps', 'GB/s', '{:.1f}'),
]


def main(argv=None):
  args = parse_args(argv)
  info = common.machine_info()
  print(f'# {info}')
  print(
    f'# bidirectional FAVOR+, B{args.batch} L={args.length} H{args.heads} '
    f'D{args.head_dim}, m={args.num_features}, float32, fwd+bwd vs a random cotangent',
    flush=True,
  )
  rows = [measure(name, fn, inputs, args.repeats) for name, (fn, inputs) in stages(args).items()]
  total = sum(r['ms'] for r in rows if r['stage'] != 'whole')
  for r in rows:
    if r['stage'] != 'whole':
      r['share'] = r['ms'] / total
  rows.append({'stage': 'sum of stages', 'ms': total})
  rows.append(
    {
      'stage': 'matmul [L,256]x[256,256]',
      'gflops': common.matmul_gflops(args.length, 256, 256, repeats=args.repeats),
    }
  )
  print(common.format_table(rows, COLUMNS))
  if args.json:
    common.write_json(args.json, {'machine': info, 'args': vars(args), 'rows': rows})
  return rows


if __name__ == '__main__':
  main()
