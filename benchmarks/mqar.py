"""Multi-query associative recall (MQAR; Zoology, arXiv 2312.04927): what each kind recalls.

    python benchmarks/mqar.py --json mqar.json --plot mqar.png   # full: 10 models trained
    python benchmarks/mqar.py --quick                            # smoke test (tests)
    python benchmarks/mqar.py --kinds favor_softmax hedgehog --windows 64 \
        --attention_option num_features=128 --steps 2000

Why: recalling a token seen earlier in the context is where fixed-state attention falls
behind softmax (Zoology; Based, arXiv 2402.18668): a feature map's state must hold every
key-value pair at once. MQAR measures that recall against the size of the state.

Task (Zoology's `multiquery_ar`): a sequence of --length tokens starts with N key-value
pairs k1 v1 k2 v2 ... (keys drawn without replacement from ids 1 .. V/2 - 1, values from
V/2 .. V - 1); then each key is queried once, at offset 2g after the pairs. The gaps g
are drawn without replacement with p(g) ~ (g + 1)^(a - 1), a = 0.01 (Zoology's power
law: most queries soon after the pairs, a few far; drawn by Gumbel top-k, the same
distribution as Zoology's successive `np.random.choice`). Every other position holds a
random token of the whole vocabulary (Zoology's random_non_queries). Loss and accuracy
count only the queried keys' positions, whose target is the key's value; the token after
a query is noise, as in Zoology, so an answer never appears in the input.

Training: one model per (kind, window) on a fresh stream of batches (seed --seed),
following Zoology's training mix (--train_mix, length:pairs items; default 64:4 128:8
256:16 256:32 256:64) as a curriculum: the lengths in turn, shortest first, each stage
the same number of tokens (700 steps of 32 = 400 at L=64, 200 at 128, 100 at 256), a
stage's rows sharing its pair counts in equal shares. Evaluated on a held-out set (seed
--seed + 1) of --eval_examples sequences of --length tokens per evaluated count. The
model is the zoo's causal LM (`performer.models`, task causal_lm): --layers blocks of
width --emb_dim, rotary positions, a short convolution of width --short_conv on q, k and
v (model.short_conv; Zoology's and Based's recall models have one), no dropout, output
head tied to the embedding with init std 0.02 (as Zoology's model; with the family's 1.0,
400 steps at L=64 reached 0.06 instead of 0.16 at 4 pairs), applied at the queried
positions only. AdamW, global-norm clip 1, 10% linear warmup then cosine decay
(`performer.training.optim`), lr 3e-3 (Zoology's MQAR sweeps span 1e-3 .. 3e-2). Random projections are drawn once, never redrawn; FAVOR++/FAVOR#'s
running statistics update in the train steps as in `train.py`. FAVOR kinds use
num_features=64 (= head_dim, so their state matches linear_elu's) unless
`--attention_option num_features=M` says otherwise.

Rows: each kind without and with an exact window of --windows tokens (attention option
`window`: exact softmax over the last W keys, the kind's features beyond;
performer/attention/window.py). Softmax has no windowed form in the zoo, so that row is
n/a. `--attention_option key=value` (repeatable) adds an option to every row, validated
by the library's own option check: an unknown option is an error.

Columns: `acc N` accuracy on the queried values of held-out sequences with N pairs
(chance 2/V; 1.0 = perfect recall); `state KiB` one layer's decoding cache for one
sequence, measured from `model.init_cache(1, --length)`: (S, z, max) for a feature map
(plus the W-token ring of raw keys and values with a window), the KV cache of all
--length tokens for softmax; `train s` wall time of training, compilation included;
`eval s` the evaluation; `loss` mean training loss over the last 10% of steps.

Runtime: 3,149 s for the full table (10 models) on 2 CPU cores shared with the test
suite for most of it: 130-400 s a model. --quick trains 3 tiny models in ~30 CPU-s.

Why the curriculum and the convolution (measured): without a short convolution a model
must learn a previous-token head and an induction head from the loss alone; 400 steps of
16 at L=256 left softmax at accuracy 0.013 / 0.006 / 0.002 (16 / 32 / 64 pairs), and at
L=64 it stayed on the plateau that picks some value of the context (~1/N) for 2400 steps
of 32. With the convolution, training at L=256 alone (300 steps, lr 1e-3 or 1e-2) or
with the lengths interleaved (600 steps) still stayed at chance; at L=64 the recall
circuit forms in ~300 steps of 32 (accuracy 0.94 / 0.90 at 4 / 8 pairs after 400), and
a curriculum that starts there carries it to L=256: softmax 0.999 at 16, 32 and 64 pairs.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import common
from benchmarks.mqar_data import TRAIN_MIX, curriculum, mqar_batch, row_pairs, train_mix
from configs import base as base_config
from performer import attention, models
from performer.training import objectives, optim

KINDS = ('softmax', 'favor_softmax', 'favor_plus_plus', 'favor_sharp', 'hedgehog', 'linear_elu')
STEPS, BATCH = 700, 32  # full mode: 400, 200 and 100 steps at L = 64, 128, 256
NUM_FEATURES = 64  # random features unless --attention_option num_features=: M = head_dim
EMBED_STD = 0.02  # GPT-2's (and Zoology's) init; the family's 1.0 stalls a tied head


def parse_option(text):
  """'key=value' -> (key, value): a Python literal where it parses, else the string."""
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise ValueError(f'expected key=value, got {text!r}')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--kinds', nargs='+', default=list(KINDS))
  p.add_argument('--windows', nargs='+', type=int, default=[0, 64], help='0 = no window')
  p.add_argument('--pairs', nargs='+', type=int, default=None, help='evaluated (16 32 64)')
  mix_help = 'training mix as length:pairs items (full: Zoology-style 64:4 128:8 256:16 ...)'
  p.add_argument('--train_mix', nargs='+', default=None, help=mix_help)
  p.add_argument('--length', type=int, default=None, help='tokens per sequence (256)')
  p.add_argument('--vocab', type=int, default=None, help='vocabulary size (8192)')
  p.add_argument('--layers', type=int, default=2)
  p.add_argument('--emb_dim', type=int, default=128)
  p.add_argument('--heads', type=int, default=2)
  p.add_argument('--mlp_dim', type=int, default=256)
  p.add_argument('--short_conv', type=int, default=4, help='q/k/v convolution width (0 = off)')
  p.add_argument('--steps', type=int, default=None, help='training steps per model')
  p.add_argument('--batch', type=int, default=None, help='sequences per step')
  p.add_argument('--lr', type=float, default=None, help='peak learning rate (1e-3)')
  p.add_argument('--warmup', type=int, default=None, help='warmup steps (10%% of --steps)')
  p.add_argument('--eval_examples', type=int, default=None, help='per pair count')
  p.add_argument('--seed', type=int, default=0)
  option_help = 'an attention option for every row (repeatable), e.g. num_features=128'
  p.add_argument('--attention_option', action='append', default=[], help=option_help)
  p.add_argument('--quick', action='store_true', help='tiny: a smoke test')
  p.add_argument('--json', default=None, help='write results here')
  p.add_argument('--plot', default=None, help='write a PNG of accuracy vs pairs here')
  args = p.parse_args(argv)
  quick = args.quick
  defaults = {
    'pairs': [2, 4] if quick else [16, 32, 64],
    'length': 32 if quick else 256,
    'vocab': 32 if quick else 8192,
    'steps': 120 if quick else STEPS,
    'batch': 16 if quick else BATCH,
    'eval_examples': 64 if quick else 256,
    'lr': 3e-3,
  }
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if quick:
    args.emb_dim, args.mlp_dim = 32, 64
    if args.kinds == list(KINDS):
      args.kinds = ['softmax', 'favor_softmax']
    if args.windows == [0, 64]:
      args.windows = [0, 8]
  if args.train_mix is None:
    args.train_mix = [f'{args.length}:{n}' for n in args.pairs] if quick else list(TRAIN_MIX)
  try:
    args.mix = train_mix(args.train_mix)
  except ValueError as e:
    p.error(f'--train_mix: {e}')
  if max(args.mix) > args.length:
    p.error(f'--train_mix lengths must not exceed --length {args.length}')
  train_pairs = [n for counts in args.mix.values() for n in counts]
  if args.warmup is None:
    args.warmup = max(1, args.steps // 10)
  if unknown := sorted(set(args.kinds) - set(attention.KINDS)):
    p.error(f'unknown kinds {unknown}; choose from {", ".join(attention.KINDS)}')
  checks = [(args.length, n) for n in args.pairs]
  checks += [(length, n) for length, counts in args.mix.items() for n in counts]
  for length, n in checks:
    if n < 1 or 4 * n > length:
      p.error(f'{n} pairs do not fit {length} tokens (need 1 <= 4 * pairs <= length)')
  if args.vocab < 2 * max(args.pairs + train_pairs) + 2:
    p.error(f'--vocab {args.vocab} is too small for {max(args.pairs)} distinct keys and values')
  try:
    args.options = dict(parse_option(text) for text in args.attention_option)
    if fixed := sorted({'kind', 'window'} & set(args.options)):
      raise ValueError(f'{fixed} are set by --kinds and --windows')
    for kind in args.kinds:
      for window in args.windows:
        models.model_config(model_dict(kind, window, args))
  except ValueError as e:
    p.error(f'--attention_option: {e}')
  return args


# --- model and training ------------------------------------------------------


def model_dict(kind, window, args):
  """config.model as a dict: the zoo's causal LM with this attention."""
  m = base_config.get_config().model.to_dict()
  m.update(
    task='causal_lm',
    vocab_size=args.vocab,
    num_layers=args.layers,
    num_heads=args.heads,
    emb_dim=args.emb_dim,
    mlp_dim=args.mlp_dim,
    max_len=args.length,
    positions='rotary',
    dropout_rate=0.0,
    tie_embeddings=True,
    embed_init_std=EMBED_STD,
    short_conv=args.short_conv,
  )
  options = {'num_features': NUM_FEATURES, **args.options}
  m['attention'] = dict(m['attention'], kind=kind, window=window, **options)
  return m


def query_logits(graphdef, trees, batch, training):
  """(logits [Q, V] at the queried positions, the running statistics after the call).

  `trees` = (params, projections, stats, rest). The model's own logits at every position
  are unused, so XLA drops them; the tied head is applied to the queried positions."""
  (_, hidden), stats = objectives.forward(
    graphdef, trees, batch['tokens'], {'mask': None}, hidden=True, training=training
  )
  picked = hidden[batch['rows'], batch['positions']]
  embedding = trees[0]['embed']['embedding'][...]
  return picked @ embedding.T.astype(picked.dtype), stats


def make_fns(graphdef, tx):
  """(train_step, eval_step), jitted. train_step(params, opt_state, stats, fixed, batch)
  -> (params, opt_state, stats, loss); eval_step(params, stats, fixed, batch) -> [Q]
  correct (1.0) or not; `fixed` = (projections, rest): never trained, never redrawn."""

  def loss_fn(params, stats, fixed, batch):
    logits, stats = query_logits(graphdef, (params, fixed[0], stats, fixed[1]), batch, True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])
    return jnp.mean(loss), stats

  @jax.jit
  def train_step(params, opt_state, stats, fixed, batch):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, fixed, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, stats, loss

  @jax.jit
  def eval_step(params, stats, fixed, batch):
    logits, _ = query_logits(graphdef, (params, fixed[0], stats, fixed[1]), batch, False)
    return (jnp.argmax(logits, axis=-1) == batch['labels']).astype(jnp.float32)

  return train_step, eval_step


def state_bytes(model, length):
  """Bytes of one layer's decoding cache for one sequence of `length` tokens."""
  cache = jax.eval_shape(lambda: model.init_cache(1, length))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache['layers'][0]))


def train_config(args):
  config = base_config.get_config().train
  config.learning_rate, config.warmup_steps, config.num_steps = args.lr, args.warmup, args.steps
  config.weight_decay, config.grad_clip, config.schedule = 0.01, 1.0, 'cosine'
  return config


def evaluate(eval_step, trees, args):
  """{pairs: accuracy} over the held-out set (seed --seed + 1): --eval_examples rows per
  count, in batches of --batch rows that mix the counts (one compiled shape)."""
  rng = np.random.default_rng(args.seed + 1)
  counts = row_pairs(args.pairs, args.batch)
  correct, total = dict.fromkeys(args.pairs, 0.0), dict.fromkeys(args.pairs, 0)
  for _ in range(-(-args.eval_examples * len(args.pairs) // args.batch)):
    hits = np.asarray(eval_step(*trees, mqar_batch(rng, counts, args.length, args.vocab)))
    per_query = np.repeat(counts, counts)
    for n in args.pairs:
      correct[n] += float(hits[per_query == n].sum())
      total[n] += int((per_query == n).sum())
  return {n: correct[n] / total[n] for n in args.pairs}, total


def run_row(kind, window, args, log):
  """Trains and evaluates one (kind, window) model; returns its table row."""
  row = {'kind': kind, 'window': window}
  if kind == 'softmax' and window:
    row['skipped'] = 'n/a: no sliding-window softmax (window is for feature maps)'
    return row
  model = models.build_model(
    model_dict(kind, window, args), rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1)
  )
  row['state_bytes'] = state_bytes(model, args.length)
  row['state_kib'] = row['state_bytes'] / 1024
  graphdef, params, projections, stats, rest = models.split(model)
  tx, _ = optim.make_optimizer(train_config(args))
  train_step, eval_step = make_fns(graphdef, tx)
  opt_state, fixed = tx.init(params), (projections, rest)
  rng = np.random.default_rng(args.seed)
  stage_of_step = curriculum(list(args.mix), args.steps)
  losses = []
  start = time.perf_counter()
  for step in range(args.steps):
    length = stage_of_step[step]
    batch = mqar_batch(rng, row_pairs(args.mix[length], args.batch), length, args.vocab)
    params, opt_state, stats, loss = train_step(params, opt_state, stats, fixed, batch)
    losses.append(loss)
    if (step + 1) % max(1, args.steps // 4) == 0:
      log(f'    step {step + 1:5d}  loss {float(loss):.3f}')
  losses = [float(x) for x in losses]
  row['train_s'] = time.perf_counter() - start
  row['loss'] = float(np.mean(losses[-max(1, len(losses) // 10) :]))
  start = time.perf_counter()
  accuracy, queries = evaluate(eval_step, (params, stats, fixed), args)
  row['eval_s'] = time.perf_counter() - start
  for n in args.pairs:
    row[f'acc_{n}'] = accuracy[n]
  row['eval_queries'] = {str(n): queries[n] for n in args.pairs}
  return row


def run(args, log=None):
  log = log or (lambda text: print(text, file=sys.stderr, flush=True))
  rows = []
  for kind in args.kinds:
    for window in args.windows:
      log(f'  {kind} window={window}')
      try:
        row = run_row(kind, window, args, log)
      except Exception as error:  # pylint: disable=broad-except
        row = common.failed_row({'kind': kind, 'window': window}, error)
      rows.append(row)
      accs = ' '.join(f'{n}: {row[f"acc_{n}"]:.3f}' for n in args.pairs if f'acc_{n}' in row)
      log(f'  {kind} window={window}: {accs or row.get("skipped")}')
  return rows


def columns(pairs):
  accuracy = [(f'acc_{n}', f'acc {n}', '{:.3f}') for n in pairs]
  return [('kind', 'kind', None), ('window', 'window', '{:d}')] + accuracy + [
    ('state_kib', 'state KiB', '{:.1f}'), ('train_s', 'train s', '{:.0f}'),
    ('eval_s', 'eval s', '{:.1f}'), ('loss', 'loss', '{:.3f}'), ('skipped', 'note', None),
  ]  # fmt: skip


def plot(rows, pairs, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = {kind: f'C{i}' for i, kind in enumerate(dict.fromkeys(r['kind'] for r in rows))}
  for row in rows:
    if all(f'acc_{n}' in row for n in pairs):
      label = row['kind'] + (f' + window {row["window"]}' if row['window'] else '')
      style = '--' if row['window'] else '-'
      accuracy = [row[f'acc_{n}'] for n in pairs]
      ax.plot(pairs, accuracy, style, color=colors[row['kind']], marker='o', label=label)
  ax.set_xscale('log', base=2)
  ax.set_xticks(pairs, [str(n) for n in pairs])
  ax.set(ylim=(-0.02, 1.02), xlabel='key-value pairs', ylabel='MQAR accuracy (held out)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'wrote {path}')


def main(argv=None):
  args = parse_args(argv)
  info = common.machine_info()
  print(f'# {info}')
  print(
    f'# MQAR: L={args.length}, vocab {args.vocab}, pairs {args.pairs} (train {" ".join(args.train_mix)});'
    f' {args.layers} layers, d={args.emb_dim}, {args.heads} heads, mlp {args.mlp_dim}, '
    f'short conv {args.short_conv}; '
    f'{args.steps} steps x {args.batch}, lr {args.lr:g}; options {args.options}',
    flush=True,
  )
  start = time.perf_counter()
  rows = run(args)
  print(common.format_table(rows, columns(args.pairs)))
  print(f'total {time.perf_counter() - start:.0f} s')
  if args.json:
    common.write_json(args.json, {'machine': info, 'args': vars(args), 'rows': rows})
  if args.plot:
    plot(rows, args.pairs, args.plot)
  return rows


if __name__ == '__main__':
  main()
