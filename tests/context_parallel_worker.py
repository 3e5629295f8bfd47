"""Run by tests/test_context_parallel.py in a fresh process with 8 forced CPU
devices: attention outputs and gradients, and decoding after a prefill, with the
length split over a `seq` mesh axis against one device. argv[1]: kinds, each
optionally with `:W` for a window of W, `:S` for S sinks and flags joined by '+': `nope`
for a feature map fed other q, k than the exact parts (`linear_nope`, `linear_qk`),
`decay` for a linear part with a half-life of 8 tokens (`linear_half_life`), `clamp` for
sinks scored at distance 12 beyond it (`rope_clamp`, `far_q`); argv[2] 'segments': only
the cases with packed segments (and padding), not those with padding alone;
'causal_segments': those, causal only, and check that bidirectional sinks and a sparse
cache raise under the mesh. Prints RESULT{json}."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from performer import attention
from performer.attention import context_parallel

B, L, H, D = 2, 64, 2, 8  # 8 or 16 positions per device; chunk 4 or 8 below


def inputs():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(B, L, H, D)), jnp.float32) for _ in range(3))
  ct = jnp.asarray(rng.normal(size=(B, L, H, D)), jnp.float32)
  # Segments of 13 and 29 positions cross every shard boundary; padding (mask False)
  # covers the end of row 0 across two shards and a stretch inside row 1.
  seg = np.zeros((B, L), np.int32)
  seg[0] = np.repeat(np.arange(5), 13)[:L]
  seg[1] = np.repeat(np.arange(3), 29)[:L]
  mask = np.ones((B, L), bool)
  mask[0, 40:] = False
  mask[1, 20:27] = False
  return q, k, v, ct, jnp.asarray(seg), jnp.asarray(mask)


def mesh_of(data, seq):
  devices = np.asarray(jax.devices()[: data * seq]).reshape(data, 1, seq)
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.sharding.Mesh(devices, ('data', 'fsdp', 'seq'), axis_types=auto)


def linear_qk(q, k, options):
  """With `linear_nope`: the (q, k) the feature map sees, unlike the exact parts'."""
  return (0.5 * q[..., ::-1], k[..., ::-1]) if options.get('linear_nope') else None


def far_q(q, options):
  """With `rope_clamp`: the queries far sinks and cached keys are scored with."""
  return -q[..., ::-1] if options.get('rope_clamp') else None


def run(kind, causal, segments, mesh, chunk, window, **options):
  attend = attention.get_attention(
    kind, num_features=16, chunk_size=chunk, window=window, **options
  )
  proj = attend.make_projection(jax.random.PRNGKey(1), D)
  q, k, v, ct, seg, mask = inputs()
  seg = seg if segments else None

  def loss(q, k, v):
    with context_parallel.sequence_parallel(mesh):
      out = attend(
        q,
        k,
        v,
        causal=causal,
        mask=mask,
        segment_ids=seg,
        projection=proj,
        linear_qk=linear_qk(q, k, options),
        far_q=far_q(q, options),
      )
    return jnp.sum(out * ct), out

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  if mesh is not None:
    sh = NamedSharding(mesh, P(('data', 'fsdp'), 'seq'))
    q, k, v = (jax.device_put(x, sh) for x in (q, k, v))
  (_, out), grads = fn(q, k, v)
  return [np.asarray(x) for x in (out, *grads)]


def decode(kind, mesh, chunk, window, **options):
  """Prefill 48 tokens (sharded or not), continue with a second prefill of 8
  (without a window) and two decoding steps; returns every output."""
  attend = attention.get_attention(
    kind, num_features=16, chunk_size=chunk, window=window, **options
  )
  proj = attend.make_projection(jax.random.PRNGKey(1), D)
  q, k, v, *_ = inputs()
  mask = jnp.ones((B, L), bool).at[0, :5].set(False)  # left padding

  def prefill(q, k, v, mask):
    with context_parallel.sequence_parallel(mesh):
      state = attend.init_state(B, H, D, D, projection=proj)
      lin, far = linear_qk(q, k, options), far_q(q, options)
      return attend.prefill(state, q, k, v, projection=proj, mask=mask, linear_qk=lin, far_q=far)

  first = slice(0, 48)
  args = (q[:, first], k[:, first], v[:, first], mask[:, first])
  if mesh is not None:
    sh = NamedSharding(mesh, P(('data', 'fsdp'), 'seq'))
    args = tuple(jax.device_put(x, sh) for x in args)
  out, state = jax.jit(prefill)(*args)
  outs = [out]
  if not window:
    more = slice(48, 56)  # continues from the carried state, unsharded
    lin, far = linear_qk(q[:, more], k[:, more], options), far_q(q[:, more], options)
    out, state = attend.prefill(
      state,
      q[:, more],
      k[:, more],
      v[:, more],
      projection=proj,
      mask=mask[:, more],
      linear_qk=lin,
      far_q=far,
    )
    outs.append(out)
  for t in (56, 57):
    lin, far = linear_qk(q[:, t], k[:, t], options), far_q(q[:, t], options)
    out, state = attend.step(
      state, q[:, t], k[:, t], v[:, t], projection=proj, linear_qk=lin, far_q=far
    )
    outs.append(out)
  return [np.asarray(x) for x in outs]


def max_error(a, b):
  return max(
    float(np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(y))))) for x, y in zip(a, b)
  )


def main():
  assert jax.device_count() == 8, jax.devices()
  result = {}
  modes = sys.argv[2:]
  with_segments = (True,) if modes in (['segments'], ['causal_segments']) else (False, True)
  directions = (True,) if modes == ['causal_segments'] else (True, False)
  for spec in sys.argv[1].split(','):  # kind, kind:window, kind:window:sinks[:nope+decay]
    kind, window, sinks, flags = (spec.split(':') + ['0', '0', ''])[:4]
    flags = flags.split('+')
    window, opts = int(window), {'sinks': int(sinks), 'linear_nope': 'nope' in flags}
    if 'decay' in flags:
      opts['linear_half_life'] = 8
    if 'clamp' in flags:
      opts['rope_clamp'] = 12
    for causal in directions:
      for segments in with_segments:
        mode = f'{"causal" if causal else "bidirectional"}/{"segments" if segments else "mask"}'
        base = run(kind, causal, segments, None, 4, window, **opts)
        result[f'{spec}/{mode}'] = {
          'seq8': max_error(run(kind, causal, segments, mesh_of(1, 8), 4, window, **opts), base),
          'data2_seq4': max_error(
            run(kind, causal, segments, mesh_of(2, 4), 8, window, **opts), base
          ),
        }
    if kind != 'softmax':
      base = decode(kind, None, 4, window, **opts)
      result[f'{spec}/decode'] = {
        'seq8': max_error(decode(kind, mesh_of(1, 8), 4, window, **opts), base)
      }
    if modes == ['causal_segments']:  # what the mesh refuses
      refused = [(False, True, opts), (True, False, {'sparse_cache': 2, 'sinks': 0})]
      for causal, segments, extra in refused:
        try:
          run(kind, causal, segments, mesh_of(1, 8), 4, max(window, 1), **extra)
        except ValueError:
          result.setdefault('raised', []).append(f'{spec}/{causal}/{extra}/ValueError')
        else:
          result.setdefault('raised', []).append(f'{spec}/{causal}/{extra}/did not raise')
  print('RESULT' + json.dumps(result))


if __name__ == '__main__':
  main()
