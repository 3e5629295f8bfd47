r"""Zoo transfer at small scale: softmax teacher -> FAVOR+ student, with and without distillation.

The Performer paper (section 4.3) loads a trained softmax Transformer's weights into a
Performer: the transferred model starts with a low accuracy (FAVOR+ approximates the
attention it was trained with, and the errors compound over layers) and recovers in a
small fraction of the original training steps. Here:

  1. train a small softmax causal LM for --teacher_steps steps with the normal training
     loop (train_and_evaluate). --data text (default): English prose from the stdlib's
     pydoc topics, written to <workdir>/pydoc_topics.txt and read as data.name='text'
     (its own sentencepiece vocabulary; configs/lm1b_transformer.py shrunk by the flags
     below). --data protein: the bundled protein sample (configs/protein_transformer_uni.py);
  2. load its parameters by name into the same model with attention --kind (init_from:
     checkpoints.load_params_by_name; the random features are the student's own draw);
  3. fine-tune for --finetune_frac of the teacher's steps, evaluating validation accuracy at
     step 0 (before any update) and every --eval_every steps, once with the plain task loss
     and once with distillation from the frozen teacher (logits, KL at temperature 1).

    python benchmarks/transfer.py                      # text: ~6 min on 2 CPU cores
    python benchmarks/transfer.py --data protein       # ~5 min: no drop (docs/transfer.md)
    python benchmarks/transfer.py --quick              # under a minute: smoke test only
    python benchmarks/transfer.py --json transfer.json
    python benchmarks/transfer.py --plot transfer.png  # the curve: zero-shot, then recovery

Every evaluation (teacher included) runs over the same whole validation split with the same
deterministic crops, so the numbers compare directly. Accuracy is next-token accuracy.
The teacher is reused when --workdir already holds its checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from benchmarks import common
from configs import lm1b_transformer, protein_transformer_uni
from performer import data
from performer.training import build, checkpoints, sharding, train_lib

DEFAULTS = {  # per --data; every value can be overridden by its flag
  'text': dict(
    teacher_steps=1500,
    finetune_frac=0.1,
    finetune_lr=1e-3,
    lr=2e-3,
    eval_every=15,
    num_features=128,
    chunk_size=64,
    layers=3,
    width=128,
    heads=4,
    seq_len=128,
    batch_size=16,
    dropout=0.1,
    vocab_size=1024,
    line_chars=400,
  ),
  'protein': dict(
    teacher_steps=400,
    finetune_frac=0.15,
    finetune_lr=1e-3,
    lr=2e-3,
    eval_every=10,
    num_features=64,
    chunk_size=64,
    layers=3,
    width=128,
    heads=4,
    seq_len=128,
    batch_size=16,
    dropout=0.0,
    vocab_size=0,
    line_chars=0,
  ),
}
QUICK = dict(
  teacher_steps=20,
  finetune_frac=0.15,
  layers=1,
  width=32,
  heads=2,
  seq_len=32,
  batch_size=4,
  eval_every=2,
  num_features=16,
  chunk_size=16,
  vocab_size=384,
)


def english_lines(max_chars=400):
  """Real English prose from the stdlib's pydoc topics (no downloads), as lines.

  Grammar rules and indented code samples are skipped; consecutive sentences of one topic
  are joined into lines of at most about `max_chars` characters, so that a line is a
  paragraph-sized context that mostly fits one training row.
  """
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  lines = []
  for name in sorted(topics.topics):
    line = ''
    for para in topics.topics[name].split('\n\n'):
      if '::=' in para or para.startswith(' '):
        continue  # grammar rules, code samples
      words = [w for w in para.split() if not re.fullmatch(r'[*=-]{3,}', w)]  # underlines
      if len(words) < 4:
        continue  # headings
      for sent in re.split(r'(?<=[.!?:])\s+', ' '.join(words)):
        if line and len(line) + 1 + len(sent) > max_chars:
          lines.append(line)
          line = ''
        line = f'{line} {sent}' if line else sent
    if line:
      lines.append(line)
  return lines


def write_corpus(workdir, lines):
  """Writes `lines` to workdir/pydoc_topics.txt (only when changed: the tokenizer that
  data.name='text' trains is cached beside the file, and a rewrite drops it)."""
  path = os.path.join(workdir, 'pydoc_topics.txt')
  text = '\n'.join(lines) + '\n'
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      if f.read() == text:
        return path
  for stale in glob.glob(path + '.spm*'):
    os.remove(stale)
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return path


def teacher_config(args, corpus_path=''):
  """The softmax LM, shrunk so that it trains in a few minutes on 2 CPU cores."""
  if args.data == 'text':
    config = lm1b_transformer.get_config()
    config.data.name = 'text'
    config.data.path = corpus_path
    config.data.vocab_size = args.vocab_size
    config.data.pack = False  # one line (about one row) per example
    config.data.crop = 'random'
    # As in the protein configs. With lm1b's sinusoidal positions the FAVOR+ student stayed
    # 1.1-1.5 points below the teacher after 20% of its steps (docs/transfer.md).
    config.model.positions = 'learned'
    config.train.weight_decay = 0.01
  else:
    config = protein_transformer_uni.get_config()
  config.model.num_layers = args.layers
  config.model.emb_dim = args.width
  config.model.mlp_dim = 4 * args.width
  config.model.num_heads = args.heads
  config.model.max_len = args.seq_len
  config.model.dropout_rate = args.dropout
  config.model.attention.chunk_size = args.chunk_size
  config.data.seq_len = args.seq_len
  config.train.batch_size = args.batch_size
  config.train.num_steps = args.teacher_steps
  config.train.learning_rate = args.lr
  config.train.warmup_steps = max(1, args.teacher_steps // 10)
  config.train.eval_every = 0
  config.train.log_every = max(1, args.teacher_steps // 4)
  config.train.checkpoint_every = args.teacher_steps
  config.train.keep_checkpoints = 1
  return config


def student_config(args, teacher_dir, distill, corpus_path=''):
  config = teacher_config(args, corpus_path).copy_and_resolve_references()
  config.model.attention.kind = args.kind
  config.model.attention.num_features = args.num_features
  config.train.redraw_every = 0  # one fixed draw for the short fine-tune
  config.train.num_steps = max(1, round(args.finetune_frac * args.teacher_steps))
  config.train.learning_rate = args.finetune_lr
  config.train.warmup_steps = max(1, config.train.num_steps // 10)
  config.train.init_from = teacher_dir
  config.train.distill_from = teacher_dir if distill else ''
  return config


def _evaluate(run, state):
  result = train_lib.evaluate(
    run.eval_fn,
    state,
    run.config,
    'validation',
    batch_sharding=run.batch_sharding,
    eval_key=run.keys['eval'],
    num_batches=0,
  )
  return result['accuracy'], result['loss']


def finetune(config, eval_every):
  """init_from + fine-tuning with the training step of train.py; returns eval curve rows."""
  run = build.setup(config)
  config, st = run.config, run.model
  params, report = checkpoints.load_params_by_name(
    config.train.init_from, st.params, st.shardings['params']
  )
  if report['only_in_checkpoint'] or report['only_in_model']:
    raise ValueError(f'architecture mismatch: {report}')
  state = st.train_state(0, jax.jit(run.tx.init)(params), params)
  it = data.build_dataset(
    config.data, split='train', batch_size=config.train.batch_size, seed=config.seed + 1
  )  # not the teacher's batch order
  curve = []
  acc, loss = _evaluate(run, state)
  curve.append({'step': 0, 'accuracy': acc, 'loss': loss, 'distill_loss': None})
  distill = []
  for step in range(config.train.num_steps):
    batch = sharding.global_batch(next(it), run.batch_sharding)
    state, m = run.train_fn(state, batch, run.keys['train'])
    if 'distill_loss' in m:
      distill.append(m['distill_loss'])
    done = step + 1
    if done % eval_every == 0 or done == config.train.num_steps:
      acc, loss = _evaluate(run, state)
      d = float(jnp.mean(jnp.stack(distill))) if distill else None
      distill = []
      curve.append({'step': done, 'accuracy': acc, 'loss': loss, 'distill_loss': d})
  return curve


def teacher_accuracy(config, teacher_dir):
  """(accuracy, loss) of the teacher's run on the validation split, as eval.py scores it."""
  result = train_lib.evaluate_run(config, teacher_dir, splits=('validation',))[2]['validation']
  return result['accuracy'], result['loss']


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', choices=sorted(DEFAULTS), default='text')
  p.add_argument('--kind', default='favor_softmax')
  for name, value in DEFAULTS['text'].items():  # default None: DEFAULTS[--data]
    p.add_argument(
      f'--{name}',
      type=type(value),
      default=None,
      help=f'default {value} (text), {DEFAULTS["protein"][name]} (protein)',
    )
  p.add_argument('--workdir', default='', help='keeps the teacher here (default: a temp dir)')
  p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke test only')
  p.add_argument('--json', default='')
  p.add_argument('--plot', default='', help='draw the accuracy curve here (PNG)')
  args = p.parse_args(argv)
  for name, value in {**DEFAULTS[args.data], **(QUICK if args.quick else {})}.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def main(argv=None):
  args = parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix='transfer_')
  teacher_dir = os.path.join(workdir, 'teacher')
  corpus = write_corpus(workdir, english_lines(args.line_chars)) if args.data == 'text' else ''

  start = time.perf_counter()
  t_config = teacher_config(args, corpus)
  if not os.path.isdir(os.path.join(teacher_dir, 'checkpoints')):
    train_lib.train_and_evaluate(t_config, teacher_dir, progress=False)
  teacher_time = time.perf_counter() - start
  t_acc, t_loss = teacher_accuracy(t_config, teacher_dir)
  unigram = data.unigram_baseline(build.resolve_config(t_config)[0].data)
  curves = {}
  for name, distill in (('finetune', False), ('finetune+distill', True)):
    curves[name] = finetune(student_config(args, teacher_dir, distill, corpus), args.eval_every)

  rows = []
  for plain, dist in zip(curves['finetune'], curves['finetune+distill']):
    rows.append(
      {
        'step': plain['step'],
        'teacher': t_acc,
        'plain': plain['accuracy'],
        'distill': dist['accuracy'],
        'gap_plain': 100 * (t_acc - plain['accuracy']),
        'gap_distill': 100 * (t_acc - dist['accuracy']),
        'kl': dist['distill_loss'],
      }
    )
  n_ft = curves['finetune'][-1]['step']
  print(
    f'data: {args.data}'
    + (f' ({corpus}, sentencepiece vocabulary {args.vocab_size})' if corpus else '')
  )
  print(
    f'teacher: softmax, {args.layers} layers x {args.width}, {args.heads} heads, '
    f'{args.teacher_steps} steps (batch {args.batch_size}, L={args.seq_len}, lr {args.lr}; '
    f'trained in {teacher_time:.0f} s)'
  )
  print(
    f'student: {args.kind}, m={args.num_features}, chunk {args.chunk_size}, fine-tuned '
    f"{n_ft} steps ({100 * n_ft / args.teacher_steps:.0f}% of the teacher's), "
    f'lr {args.finetune_lr}'
  )
  print(
    f'validation next-token accuracy over {unigram["num_tokens"]} tokens (majority-token '
    f'baseline {unigram["accuracy"]:.4f}); gap = teacher - student in points'
  )
  print(
    common.format_table(
      rows,
      [
        ('step', 'step', '{}'),
        ('teacher', 'teacher', '{:.4f}'),
        ('plain', 'transfer', '{:.4f}'),
        ('gap_plain', 'gap', '{:+.2f}'),
        ('distill', 'transfer+distill', '{:.4f}'),
        ('gap_distill', 'gap', '{:+.2f}'),
        ('kl', 'train KL', '{:.4f}'),
      ],
    )
  )
  print(
    f'validation loss: teacher {t_loss:.4f} (unigram {unigram["cross_entropy"]:.4f}); '
    f'transfer {curves["finetune"][0]["loss"]:.4f} at step 0 -> '
    f'{curves["finetune"][-1]["loss"]:.4f} plain / '
    f'{curves["finetune+distill"][-1]["loss"]:.4f} distilled at step {n_ft}'
  )
  total = time.perf_counter() - start
  print(f'total {total:.0f} s')
  if args.json:
    common.write_json(
      args.json,
      {
        'args': vars(args),
        'machine': common.machine_info(),
        'teacher': {'accuracy': t_acc, 'loss': t_loss, 'seconds': teacher_time},
        'unigram': unigram,
        'curves': curves,
        'rows': rows,
        'seconds': total,
      },
    )
  if args.plot:
    title = (
      f'{args.data}: softmax teacher ({args.teacher_steps} steps) -> {args.kind}, '
      f'm={args.num_features}'
    )
    plot(rows, args.plot, unigram['accuracy'], title)
  return rows


def plot(rows, path, baseline, title):
  """Validation accuracy against fine-tuning steps: the transferred student without and with
  distillation (step 0 = zero-shot, the softmax weights under the new attention), the
  softmax teacher and the majority-token baseline as horizontal lines."""
  from performer import plot as figures  # pylint: disable=g-import-not-at-top

  plt = figures._pyplot()  # pylint: disable=protected-access
  steps = [r['step'] for r in rows]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  ax.axhline(rows[0]['teacher'], color='black', linestyle='--', label='softmax teacher')
  ax.axhline(baseline, color='grey', linestyle=':', label='majority-token baseline')
  ax.plot(steps, [r['plain'] for r in rows], marker='o', label='transferred, fine-tuned')
  ax.plot(steps, [r['distill'] for r in rows], marker='s', label='transferred + distillation')
  ax.annotate(
    'zero-shot',
    (steps[0], rows[0]['plain']),
    xytext=(8, -14),
    textcoords='offset points',
    fontsize=8,
  )
  ax.set_xlabel('fine-tuning step')
  ax.set_ylabel('validation next-token accuracy')
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  figures.save(fig, path)
  plt.close(fig)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
