"""How well each random-feature kind approximates a real pretrained model's attention.

    python benchmarks/pretrained_error.py                      # SmolLM2, 512 tokens, ~5 min
    python benchmarks/pretrained_error.py --kinds favor_softmax favor_plus_plus \
        --num_features 64 128 256 --window 0 64 --seeds 4 --json error.json

SmolLM2-135M-Instruct (the installed GGUF, `configs/linearize_smollm2.py`'s source) reads
the first held-out tokens of English (the test split of `english_docs`, the documents the
conversion never trains on) with exact softmax attention; every layer's q, k, v (after
the rotary positions) and softmax output are captured. Each kind then attends over the
same q, k, v, causally, with its own random features (several draws), and is compared
with softmax, layer by layer:

- `out rel err`: |out - softmax out|^2 / |softmax out|^2 of the attention output (what
  attention transfer minimises), mean over layers and draws; above 1, the output is
  further from softmax's than a zero output would be;
- `weights TV`: total-variation distance between each query's attention row and the
  softmax row, 0.5 sum_j |p_j - p^_j|, mean over queries, heads, layers and draws;
- `A`: FAVOR++/FAVOR#'s chosen A per head (mean over heads and layers; 0 for FAVOR+).

FAVOR++ and FAVOR# are given oracle statistics: the moments of this very document
(one calibration pass, then frozen), the best their running averages could do. With
`--window W` the last W keys are exact and only the older ones are estimated; a window of
at least `--length` is exact softmax (a control: both errors are then ~0). No
training happens here: this is what the random features bring to attention transfer.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from performer import attention, data, models  # noqa: E402
from performer.attention.layers import repeat_kv  # noqa: E402
from performer.training import build, config_utils, sharding, text_eval  # noqa: E402

CONFIG = os.path.join(ROOT, 'configs', 'linearize_smollm2.py')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--kinds', nargs='+', default=['favor_softmax', 'favor_plus_plus', 'favor_sharp'])
  p.add_argument('--num_features', nargs='+', type=int, default=[128])
  p.add_argument('--window', nargs='+', type=int, default=[0, 64])
  p.add_argument('--seeds', type=int, default=2, help='random feature draws per setting')
  p.add_argument('--length', type=int, default=512, help='tokens of the held-out document')
  p.add_argument('--layers', type=int, default=0, help='only the first N layers (0 = all)')
  p.add_argument('--config', default=CONFIG, help='a config whose init_from is the model')
  p.add_argument('--json', default=None)
  return p.parse_args(argv)


def held_out_tokens(data_config, vocab, length):
  """The first `length` tokens of the data's test split, as the pipeline splits it."""
  docs = data.dataset_for(data_config).source(data_config, 'test')
  return text_eval.tokenize(vocab, '\n'.join(docs), max_tokens=length)


def capture(config_path, length):
  """({layer path: (q, k, v, softmax output)}, heads, head_dim) of the softmax model."""
  config = config_utils.load_config(config_path)
  config, vocab = build.resolve_config(config)
  mesh = sharding.make_mesh(config.mesh)
  source = config.train.distill_from or config.train.init_from
  state, params, _ = build.load_original(config, source, mesh, '--config init_from')
  model = nnx.merge(state.graphdef, params, state.projections, state.stats, state.rest)
  tokens = jnp.asarray(held_out_tokens(config.data, vocab, length))[None]
  _, sown = models.capture_intermediates(model, tokens, deterministic=True)
  layers = {}
  for key in sorted(sown, key=lambda k: [int(p) if p.isdigit() else p for p in k.split('.')]):
    if key.endswith('.qkv'):
      path = key[: -len('.qkv')]
      layers[path] = (*sown[key], sown[f'{path}.attended'])
  q = next(iter(layers.values()))[0]
  return layers, q.shape[2], q.shape[3]


def softmax_weights(layers, heads, head_dim):
  """Each layer's causal softmax attention matrix [1, H, L, L], computed once."""
  softmax = attention.build('softmax', head_dim=head_dim, num_heads=heads)
  return [softmax.weights(q, k, causal=True) for q, k, _, _ in layers.values()]


def _calibrated(module, q, k, v):
  """FAVOR++/FAVOR#: one pass that stores this document's moments, then frozen."""
  module.set_attributes(use_running_average=False, raise_if_not_found=False)
  module(q, k, v, causal=True)
  module.set_attributes(use_running_average=True, raise_if_not_found=False)
  return module


def chosen_a(module, q, k):
  fmap = getattr(module, 'feature_map', None)  # softmax and identity have none
  if not hasattr(fmap, 'moments'):
    return 0.0
  ctx = fmap.calibrate(q, repeat_kv(k, q.shape[2]), causal=True)
  return float(jnp.mean(ctx['a']))


def measure(layers, exact_weights, heads, head_dim, kind, m, window, seed):
  errors, tvs, a_values = [], [], []
  for index, (q, k, v, target) in enumerate(layers.values()):
    module = attention.build(
      kind,
      head_dim=head_dim,
      num_heads=heads,
      rngs=nnx.Rngs(params=1000 * seed + index),
      num_features=m,
      window=window,
    )
    module = _calibrated(module, q, k, v)
    out = module(q, k, v, causal=True).astype(jnp.float32)
    target = target.astype(jnp.float32)
    errors.append(float(jnp.sum((out - target) ** 2) / jnp.sum(target**2)))
    p = exact_weights[index]
    p_hat = module.weights(q, k, causal=True)
    tvs.append(float(jnp.mean(0.5 * jnp.sum(jnp.abs(p - p_hat), axis=-1))))
    a_values.append(chosen_a(module, q, k))
  return np.mean(errors), np.mean(tvs), np.mean(a_values), errors


COLUMNS = [
  ('kind', 'kind', None),
  ('num_features', 'm', None),
  ('window', 'window', None),
  ('out_rel_err', 'out rel err', '{:.4f}'),
  ('out_rel_err_std', '+- (draws)', '{:.4f}'),
  ('weights_tv', 'weights TV', '{:.4f}'),
  ('a', 'A', '{:.3f}'),
]


def main(argv=None):
  args = parse_args(argv)
  info = common.machine_info()
  print(f'# {info}')
  layers, heads, head_dim = capture(args.config, args.length)
  if args.layers:
    layers = dict(list(layers.items())[: args.layers])
  print(
    f'# {len(layers)} layers, {heads} heads x {head_dim}, {args.length} held-out tokens', flush=True
  )
  exact_weights = softmax_weights(layers, heads, head_dim)
  rows = []
  for window in args.window:
    for m in args.num_features:
      for kind in args.kinds:
        runs = [
          measure(layers, exact_weights, heads, head_dim, kind, m, window, s)
          for s in range(args.seeds)
        ]
        errs = [r[0] for r in runs]
        rows.append(
          {
            'kind': kind,
            'num_features': m,
            'window': window,
            'out_rel_err': float(np.mean(errs)),
            'out_rel_err_std': float(np.std(errs)),
            'weights_tv': float(np.mean([r[1] for r in runs])),
            'a': float(np.mean([r[2] for r in runs])),
            'per_layer_out_rel_err': np.mean([r[3] for r in runs], axis=0).tolist(),
          }
        )
        print(common.format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
  print(common.format_table(rows, COLUMNS))
  if args.json:
    common.write_json(args.json, {'machine': info, 'args': vars(args), 'rows': rows})
  return rows


if __name__ == '__main__':
  main()
