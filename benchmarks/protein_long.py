r"""Long proteins: a Performer against the largest softmax Transformer in the same memory.

The Performer paper's long-protein experiment at our scale (configs/protein_long.py):
packed rows of 8,192 residues, a causal FAVOR+ Performer (configs/protein_long.py) and
the largest exact-softmax Transformer whose training step fits the same memory budget
(configs/protein_long_transformer.py). The budget is MEMORY_BUDGET_GIB of
configs/protein_long.py: peak memory of one training step as XLA's buffer assignment of
the compiled step reports it (arguments + outputs + temporaries - donated aliases;
benchmarks/common.compile_stats), the step being exactly the one train.py runs
(build.setup's train_fn on a real packed batch). A third row, the softmax Transformer of
the Performer's size, shows why it had to shrink; it is compiled, never run.

    python benchmarks/protein_long.py                       # memory of the three (~1 min)
    python benchmarks/protein_long.py --time_steps 3        # + seconds per step of each
    python benchmarks/protein_long.py --train --workdir /tmp/protein_long_bench \
        --json protein_long.json                            # + train both, 10 min each

--train runs the two configs one after the other through train_lib.train_and_evaluate,
each stopping after train.time_limit_minutes (10) of wall time in its training loop
(--minutes overrides), then evaluating on the whole validation split; the table gives
the steps each completed and its validation perplexity. --override key=value (repeatable)
applies to every config (tests shrink everything with it).

Memory-only mode, measured (jax 0.10.2, CPU; budget 2.5 GiB):

    performer          favor_softmax  3x128 (4h)  602,525 params   0.688 GiB  fits
    transformer        softmax        2x128 (1h)  404,253 params   1.940 GiB  fits
    softmax_same_size  softmax        3x128 (4h)  602,525 params  10.310 GiB  does not
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

from benchmarks import common  # noqa: E402
from benchmarks import model as model_bench  # noqa: E402
from configs import protein_long  # noqa: E402
from performer import data  # noqa: E402
from performer.training import build, config_utils, sharding, train_lib  # noqa: E402

# (name, config file, extra overrides, trained): the third is memory only.
MODELS = (
  ('performer', 'protein_long.py', (), True),
  ('transformer', 'protein_long_transformer.py', (), True),
  ('softmax_same_size', 'protein_long.py', ('model.attention.kind=softmax',), False),
)
GIB = 2**30


def load(config_file, overrides):
  path = os.path.join(ROOT, 'configs', config_file)
  return config_utils.validate(config_utils.load_config(path, list(overrides)))


def step_memory(config, time_steps=0):
  """(row, compiled step) for `config`: parameters, XLA's peak bytes of the compiled
  train step on a real (packed) training batch, and with `time_steps` the best seconds
  of that many steps after a warm-up step."""
  run = build.setup(config)
  model = run.model
  state = model.train_state(0, jax.jit(run.tx.init)(model.params))
  batch = next(
    data.build_dataset(
      run.config.data, split='train', batch_size=run.config.train.batch_size, seed=config.seed
    )
  )
  batch = sharding.global_batch(train_lib.model_batch(batch, run.config.data), run.batch_sharding)
  start = time.perf_counter()
  compiled, peak, _ = common.compile_stats(run.train_fn, state, batch, run.keys['train'])
  m = run.config.model
  row = {
    'attention': m.attention.kind,
    'size': f'{m.num_layers}x{m.emb_dim} ({m.num_heads}h)',
    'params': sum(x.size for x in jax.tree.leaves(model.params)),
    'peak_gib': None if peak is None else peak / GIB,
    'compile_s': time.perf_counter() - start,
  }
  if time_steps:
    args = (state, batch, run.keys['train'])
    row['step_s'], _ = model_bench.time_steps(compiled, args, time_steps, float('inf'))
  return row


def train(config, workdir):
  """Trains `config` in a fresh `workdir`; returns steps, validation perplexity, wall."""
  start = time.perf_counter()
  result = train_lib.train_and_evaluate(config, workdir, progress=False)
  return {
    'steps': result['step'],
    'val_ppl': result['final']['validation']['perplexity'],
    'val_loss': result['final']['validation']['loss'],
    'wall_min': (time.perf_counter() - start) / 60,
    'unigram_ppl': result['unigram'].get('validation', {}).get('perplexity'),
  }


COLUMNS = [
  ('model', 'model', None),
  ('attention', 'attention', None),
  ('size', 'layers x width', None),
  ('params', 'params', '{:,d}'),
  ('peak_gib', 'peak step GiB', '{:.3f}'),
  ('fits', 'fits budget', None),
  ('step_s', 's / step', '{:.2f}'),
  ('steps', 'steps done', '{:d}'),
  ('val_ppl', 'val perplexity', '{:.3f}'),
  ('wall_min', 'wall min', '{:.1f}'),
]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--budget_gib', type=float, default=protein_long.MEMORY_BUDGET_GIB)
  p.add_argument('--override', nargs='+', default=[], help='key=value for every config')
  p.add_argument('--time_steps', type=int, default=0, help='time this many steps of each')
  p.add_argument('--train', action='store_true', help='train both for the same wall time')
  p.add_argument('--workdir', default=None, help='--train: runs go in WORKDIR/<model>')
  p.add_argument('--minutes', type=float, default=None, help='--train: time limit of each')
  p.add_argument('--json', default=None, help='write the rows here')
  args = p.parse_args(argv)
  if args.train and not args.workdir:
    p.error('--train needs --workdir')
  return args


def run(args, log=print):
  """The rows of the table: memory (and optionally time) of all three, then training."""
  for name, *_, trained in MODELS if args.train else ():
    workdir = os.path.join(args.workdir, name)
    if trained and os.path.isdir(workdir) and os.listdir(workdir):
      raise SystemExit(f'{workdir} is not empty (a run there would resume); remove it first')
  rows = []
  for name, config_file, extra, trained in MODELS:
    config = load(config_file, list(extra) + list(args.override))
    row = {'model': name, **step_memory(config, args.time_steps if trained else 0)}
    row['fits'] = 'yes' if row['peak_gib'] <= args.budget_gib else 'NO'
    rows.append(row)
    log(f'  {name}: {row["size"]}, peak {row["peak_gib"]:.3f} GiB ({row["fits"]})')
  for row, (name, config_file, extra, trained) in zip(rows, MODELS):
    if not (args.train and trained):
      continue
    minutes = [f'train.time_limit_minutes={args.minutes}'] if args.minutes is not None else []
    config = load(config_file, list(extra) + list(args.override) + minutes)
    log(f'  training {name} for {config.train.time_limit_minutes:g} min ...')
    row.update(train(config, os.path.join(args.workdir, name)))
  return rows


def main(argv=None):
  args = parse_args(argv)
  info = common.machine_info()
  print(f'# {info}')
  print(
    f'# budget: peak training-step memory <= {args.budget_gib:g} GiB '
    "(XLA's buffer assignment of the compiled step)",
    flush=True,
  )
  rows = run(args)
  print(common.format_table(rows, COLUMNS))
  unigram = next((r['unigram_ppl'] for r in rows if r.get('unigram_ppl')), None)
  if unigram:
    print(f'unigram baseline validation perplexity {unigram:.3f}')
  if args.json:
    common.write_json(
      args.json, {'machine': info, 'budget_gib': args.budget_gib, 'args': vars(args), 'rows': rows}
    )
  return rows


if __name__ == '__main__':
  main()
