r"""Zoo transfer at small scale: softmax teacher -> FAVOR+ student, with and without distillation.

The Performer paper (section 4.3) loads a trained softmax Transformer's weights into a
Performer: the transferred model starts with a low accuracy (FAVOR+ approximates the
attention it was trained with, and the errors compound over layers) and recovers in a
small fraction of the original training steps. Here, on the bundled protein sample:

  1. train a small softmax causal LM (configs/protein_transformer_uni.py, shrunk by the
     flags below) for --teacher_steps steps with the normal training loop (train_and_evaluate);
  2. load its parameters by name into the same model with attention --kind (init_from:
     checkpoints.load_params_by_name; the random features are the student's own draw);
  3. fine-tune for --finetune_frac of the teacher's steps, evaluating validation accuracy at
     step 0 (before any update) and every --eval_every steps, once with the plain task loss
     and once with distillation from the frozen teacher (logits, KL at temperature 1).

    python benchmarks/transfer.py                      # ~4-6 min on 2 CPU cores
    python benchmarks/transfer.py --quick              # seconds: smoke test only
    python benchmarks/transfer.py --json transfer.json

Every evaluation (teacher included) runs over the same whole validation split with the same
deterministic crops, so the numbers compare directly. Accuracy is next-residue accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from benchmarks import common
from configs import protein_transformer_uni
from performer import data
from performer.training import checkpoints
from performer.training import sharding
from performer.training import train_lib


def teacher_config(args):
  """The softmax protein LM, shrunk so that it trains in a few minutes on 2 CPU cores."""
  config = protein_transformer_uni.get_config()
  config.model.num_layers = args.layers
  config.model.emb_dim = args.width
  config.model.mlp_dim = 4 * args.width
  config.model.num_heads = args.heads
  config.model.max_len = args.seq_len
  config.model.dropout_rate = 0.0
  config.data.seq_len = args.seq_len
  config.train.batch_size = args.batch_size
  config.train.num_steps = args.teacher_steps
  config.train.warmup_steps = max(1, args.teacher_steps // 10)
  config.train.eval_every = 0
  config.train.log_every = max(1, args.teacher_steps // 4)
  config.train.checkpoint_every = args.teacher_steps
  config.train.keep_checkpoints = 1
  return config


def student_config(args, teacher_dir, distill):
  config = teacher_config(args).copy_and_resolve_references()
  config.model.attention.kind = args.kind
  config.model.attention.num_features = args.num_features
  config.train.redraw_every = 0  # one fixed draw for the short fine-tune
  config.train.num_steps = max(1, round(args.finetune_frac * args.teacher_steps))
  config.train.learning_rate = args.finetune_lr
  config.train.warmup_steps = max(1, config.train.num_steps // 10)
  config.train.init_from = teacher_dir
  config.train.distill_from = teacher_dir if distill else ''
  return config


def _evaluate(run, params, features, rest):
  result = train_lib.evaluate(run['eval_fn'], params, features, rest, run['config'],
                              'validation', batch_sharding=run['batch_sharding'],
                              eval_key=run['keys']['eval'], num_batches=0)
  return result['accuracy'], result['loss']


def finetune(config, eval_every):
  """init_from + fine-tuning with the training step of train.py; returns eval curve rows."""
  run = train_lib.setup(config)
  config, st = run['config'], run['state']
  params, report = checkpoints.load_params_by_name(
      config.train.init_from, st['params'], st['shardings']['params'])
  if report['only_in_checkpoint'] or report['only_in_model']:
    raise ValueError(f'architecture mismatch: {report}')
  features, rest = st['features'], st['rest']
  opt_state = jax.jit(run['tx'].init)(params)
  it = data.build_dataset(config.data, split='train', batch_size=config.train.batch_size,
                          seed=config.seed + 1)  # not the teacher's batch order
  curve = []
  acc, loss = _evaluate(run, params, features, rest)
  curve.append({'step': 0, 'accuracy': acc, 'loss': loss, 'distill_loss': None})
  distill = []
  for step in range(config.train.num_steps):
    batch = sharding.global_batch(next(it), run['batch_sharding'])
    params, opt_state, m = run['train_fn'](params, opt_state, features, rest, batch,
                                           jnp.asarray(step, jnp.int32), run['keys']['train'])
    if 'distill_loss' in m:
      distill.append(m['distill_loss'])
    done = step + 1
    if done % eval_every == 0 or done == config.train.num_steps:
      acc, loss = _evaluate(run, params, features, rest)
      d = float(jnp.mean(jnp.stack(distill))) if distill else None
      distill = []
      curve.append({'step': done, 'accuracy': acc, 'loss': loss, 'distill_loss': d})
  return curve


def teacher_accuracy(config, teacher_dir):
  run = train_lib.setup(config)
  st = run['state']
  params, _ = checkpoints.load_params_by_name(teacher_dir, st['params'],
                                              st['shardings']['params'])
  return _evaluate(run, params, st['features'], st['rest'])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--teacher_steps', type=int, default=400)
  p.add_argument('--finetune_frac', type=float, default=0.15)
  p.add_argument('--finetune_lr', type=float, default=1e-3)
  p.add_argument('--eval_every', type=int, default=10)
  p.add_argument('--kind', default='favor_softmax')
  p.add_argument('--num_features', type=int, default=64)
  p.add_argument('--layers', type=int, default=3)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--workdir', default='', help='keeps the teacher here (default: a temp dir)')
  p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke test only')
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  if args.quick:
    args.teacher_steps, args.layers, args.width, args.heads = 20, 1, 32, 2
    args.seq_len, args.batch_size, args.eval_every, args.num_features = 32, 4, 2, 16
  workdir = args.workdir or tempfile.mkdtemp(prefix='transfer_')
  teacher_dir = os.path.join(workdir, 'teacher')

  start = time.perf_counter()
  t_config = teacher_config(args)
  if not os.path.isdir(os.path.join(teacher_dir, 'checkpoints')):
    train_lib.train_and_evaluate(t_config, teacher_dir, progress=False)
  teacher_time = time.perf_counter() - start
  t_acc, t_loss = teacher_accuracy(t_config, teacher_dir)
  curves = {}
  for name, distill in (('finetune', False), ('finetune+distill', True)):
    curves[name] = finetune(student_config(args, teacher_dir, distill), args.eval_every)

  rows = []
  for plain, dist in zip(curves['finetune'], curves['finetune+distill']):
    rows.append({'step': plain['step'], 'teacher': t_acc, 'plain': plain['accuracy'],
                 'distill': dist['accuracy'], 'gap_plain': 100 * (t_acc - plain['accuracy']),
                 'gap_distill': 100 * (t_acc - dist['accuracy']), 'kl': dist['distill_loss']})
  n_ft = curves['finetune'][-1]['step']
  print(f'teacher: softmax, {args.layers} layers x {args.width}, {args.teacher_steps} steps '
        f'(batch {args.batch_size}, L={args.seq_len}; trained in {teacher_time:.0f} s)')
  print(f'student: {args.kind}, m={args.num_features}, fine-tuned {n_ft} steps '
        f'({100 * n_ft / args.teacher_steps:.0f}% of the teacher\'s), lr {args.finetune_lr}')
  print('validation next-residue accuracy; gap = teacher - student in points')
  print(common.format_table(rows, [
      ('step', 'step', '{}'), ('teacher', 'teacher', '{:.4f}'),
      ('plain', 'transfer', '{:.4f}'), ('gap_plain', 'gap', '{:+.2f}'),
      ('distill', 'transfer+distill', '{:.4f}'), ('gap_distill', 'gap', '{:+.2f}'),
      ('kl', 'train KL', '{:.4f}')]))
  print(f'total {time.perf_counter() - start:.0f} s')
  if args.json:
    common.write_json(args.json, {'args': vars(args), 'machine': common.machine_info(),
                                  'teacher': {'accuracy': t_acc, 'loss': t_loss},
                                  'curves': curves, 'rows': rows})
  return rows


if __name__ == '__main__':
  main()
