"""Shared benchmark helpers: timing, XLA memory and FLOP counts, tables, JSON.

Peak memory is XLA's buffer assignment for the compiled program (arguments +
outputs + temporaries), which is exact for what the program allocates and
works the same on CPU and GPU.
"""

from __future__ import annotations

import json
import platform
import time

import jax
import jax.numpy as jnp

from performer.training.long_context import xla_bytes  # the one formula


def compile_stats(fn, *args):
  """Compiles ``fn`` (already jitted) and returns (compiled, bytes, flops)."""
  compiled = fn.lower(*args).compile()
  peak = xla_bytes(compiled)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  return compiled, peak, flops


def failed_row(row, error):
  """``row`` marked skipped with ``error``'s one-line reason: one case that fails to
  compile or run (out of memory, a kernel a backend lacks) costs its row, not the table."""
  reason = str(error).strip().splitlines()[0] if str(error).strip() else ''
  row['skipped'] = f'failed: {type(error).__name__}: {reason[:120]}'
  return row


def time_call(compiled, *args, repeats=3):
  """Best wall time of ``repeats`` calls after one warm-up call."""
  jax.block_until_ready(compiled(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_gflops(m, k, n, dtype=jnp.float32, repeats=5):
  """GFLOP/s of a plain [m, k] @ [k, n] matmul: the machine's yardstick."""
  a = jnp.ones((m, k), dtype)
  b = jnp.ones((k, n), dtype)
  fn = jax.jit(lambda a, b: a @ b)
  seconds = time_call(fn, a, b, repeats=repeats)
  return 2.0 * m * k * n / seconds / 1e9


def machine_info():
  device = jax.devices()[0]
  return {
    'backend': jax.default_backend(),
    'device': device.device_kind,
    'num_devices': jax.device_count(),
    'jax': jax.__version__,
    'python': platform.python_version(),
    'machine': platform.machine(),
  }


def format_table(rows, columns):
  """Plain-text table; ``columns`` is a list of (key, header, format)."""
  cells = [[header for _, header, _ in columns]]
  for row in rows:
    line = []
    for key, _, fmt in columns:
      value = row.get(key)
      line.append('-' if value is None else (fmt.format(value) if fmt else str(value)))
    cells.append(line)
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  out = []
  for index, line in enumerate(cells):
    out.append('  '.join(c.rjust(w) for c, w in zip(line, widths)))
    if index == 0:
      out.append('  '.join('-' * w for w in widths))
  return '\n'.join(out)


def write_json(path, payload):
  with open(path, 'w') as f:
    json.dump(payload, f, indent=2)
  print(f'wrote {path}')
