"""Tasks as objects: what a model predicts and how it is scored, one `Task` per name.

`TASKS` maps `config.model.task` to its `Task`; nothing else in the package compares task
names, so a new task is one class and one row here. A task owns its targets (inputs,
targets, weights from the task-agnostic batch, inside the jitted step, so BERT masking draws
fresh masks every step), its loss terms and eval sums, the metrics it reports and their
table, whether it learns from a teacher, whether it is causal (and so decodable) and what
its samples are. Models ask it for the target offset and the extra start token.

Tasks are frozen and hashable: steps close over the one `for_run` binds to the vocabulary.
This module needs only jax, so models and training both import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

# ------------------------------------------------------------------------------ targets


def causal_targets(batch):
  """Position t predicts token t+1 of the same segment; the last position predicts nothing."""
  tokens, mask, seg = batch['tokens'], batch['mask'], batch.get('segment_ids')
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  weights = mask[:, 1:] & mask[:, :-1]
  if seg is not None:
    weights = weights & (seg[:, 1:] == seg[:, :-1])
  weights = jnp.pad(weights, ((0, 0), (0, 1)))
  return tokens, targets, weights


def mlm_targets(batch, key, *, rate, mask_id, special_ids, vocab_size, mask_all=False):
  """BERT masking: pick `rate` of the real tokens; 80% -> MASK, 10% -> random, 10% kept.

  Special tokens (PAD/BOS/EOS/MASK) are never picked, and random replacements are never
  special tokens. `mask_all` (eval) replaces every picked token by MASK: the 10% kept
  tokens would otherwise be visible answers, inflating accuracy and making the number
  incomparable with the unigram baseline.
  """
  tokens, mask = batch['tokens'], batch['mask']
  special = jnp.asarray(special_ids, jnp.int32)
  is_special = jnp.any(tokens[..., None] == special, axis=-1)
  k_pick, k_how, k_rand = jax.random.split(key, 3)
  picked = mask & ~is_special & jax.random.bernoulli(k_pick, rate, tokens.shape)
  how = jax.random.uniform(k_how, tokens.shape)
  # Sample among the non-special ids: draw an index into [0, V - n_special) and skip specials.
  normal_ids = jnp.setdiff1d(jnp.arange(vocab_size), special, size=vocab_size - len(special_ids))
  random_tokens = normal_ids[jax.random.randint(k_rand, tokens.shape, 0, normal_ids.shape[0])]
  if mask_all:
    return jnp.where(picked, mask_id, tokens).astype(tokens.dtype), tokens, picked
  inputs = jnp.where(picked & (how < 0.8), mask_id, tokens)
  inputs = jnp.where(picked & (how >= 0.8) & (how < 0.9), random_tokens, inputs)
  return inputs.astype(tokens.dtype), tokens, picked


# --------------------------------------------------------------------------------- sums
# Sums, not means, so micro-batches, devices and eval batches add up and divide once.


def token_sums(logits, targets, weights):
  """Summed cross-entropy, correct predictions and weight over the weighted tokens."""
  logits = logits.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
    'loss_sum': jnp.sum(loss * w),
    'correct_sum': jnp.sum(correct * w),
    'weight_sum': jnp.sum(w),
  }


def cosine_sums(student, teacher, weights):
  """An encoder's sums against the frozen teacher's hidden states: the per-token squared
  error averaged over features ('loss_sum') and the cosine similarity ('cosine_sum')."""
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  student = student.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  cosine = jnp.sum(student * teacher, -1) / jnp.maximum(
    jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1), 1e-9
  )
  return {
    'loss_sum': jnp.sum(jnp.mean(jnp.square(student - teacher), axis=-1) * w),
    'cosine_sum': jnp.sum(cosine * w),
    'weight_sum': jnp.sum(w),
  }


def sentence_sums(student, teacher, weights, segment_ids=None):
  """Cosine of mean-pooled sentence embeddings (sentence-transformers' pooling) per
  sentence: a row, or a packed segment of one. {'sentence_cosine_sum', 'sentences'}."""
  b, length, _ = student.shape
  w = weights.astype(jnp.float32)[..., None]
  seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
  ids = (jnp.arange(b)[:, None] * length + seg).reshape(-1)
  pool = lambda x: jax.ops.segment_sum(
    (x.astype(jnp.float32) * w).reshape(b * length, -1), ids, b * length
  )
  s_emb, t_emb = pool(student), pool(jax.lax.stop_gradient(teacher))
  count = jax.ops.segment_sum(w.reshape(-1), ids, b * length)
  norms = jnp.linalg.norm(s_emb, axis=-1) * jnp.linalg.norm(t_emb, axis=-1)
  cosine = jnp.sum(s_emb * t_emb, -1) / jnp.maximum(norms, 1e-12)
  real = count > 0
  return {
    'sentence_cosine_sum': jnp.sum(jnp.where(real, cosine, 0.0)),
    'sentences': jnp.sum(real.astype(jnp.float32)),
  }


# --------------------------------------------------------------------------- loss terms
# objectives.Supervised adds a task's terms (and distillation); each maps (student
# outputs, teacher outputs, micro-batch) to (loss, sums).


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """The task's own loss on its targets."""

  needs_teacher = False
  needs_hidden = False

  def __call__(self, student, teacher, micro):
    sums = token_sums(student[0], micro['targets'], micro['weights'])
    return sums['loss_sum'], sums


@dataclasses.dataclass(frozen=True)
class HiddenStateMatch:
  """An encoder's task: its hidden states (the model's output) against the teacher's."""

  needs_teacher = True
  needs_hidden = False

  def __call__(self, student, teacher, micro):
    sums = cosine_sums(student[0], teacher[0], micro['weights'])
    return sums['loss_sum'], sums


# -------------------------------------------------------------------------------- tasks


def _row(label, split, values, widths, digits):
  return f'{label:18s}{split:>12s}' + ''.join(
    f'{v:{w}.{d}f}' for v, w, d in zip(values, widths, digits)
  )


@dataclasses.dataclass(frozen=True)
class Task:
  """A token-predicting task; subclasses set the facts below and override what differs."""

  name: ClassVar[str]
  causal: ClassVar[bool] = False  # attention sees only the past, so the model decodes
  target_offset: ClassVar[int] = 0  # logits[t] predict tokens[t + target_offset]
  start_token: ClassVar[bool] = False  # the model shifts its input right behind an extra id
  image: ClassVar[bool] = False  # needs model.image_shape; axial positions; bits per dim
  needs_teacher: ClassVar[bool] = False  # its own loss is against a frozen teacher
  predicts_tokens: ClassVar[bool] = True  # its loss is a token cross-entropy (word ppl, unigram)
  samples: ClassVar[str | None] = None  # what sample.py writes: 'text', 'image' or None

  def bind(self, model_config, train_config, vocab) -> Task:
    """This task for one run (vocabulary, MLM rate); most tasks need nothing."""
    del model_config, train_config, vocab
    return self

  def targets(self, batch, key, evaluating=False):
    """(inputs, targets, weights); `key` is only used by MLM."""
    del key, evaluating
    return batch['tokens'], batch['tokens'], batch['mask']

  def loss_terms(self) -> tuple:
    return (CrossEntropy(),)

  def eval_sums(self, out, teacher_out, targets, weights, batch):
    """Eval token sums of the model's outputs (and the teacher's, if it needs one)."""
    del teacher_out, batch
    return token_sums(out, targets, weights)

  def summary(self, sums) -> dict:
    """Eval sums as metrics: loss, accuracy, perplexity, tokens."""
    weight = max(float(sums['weight_sum']), 1.0)
    loss = float(sums['loss_sum']) / weight
    return {
      'loss': loss,
      'accuracy': float(sums['correct_sum']) / weight,
      'perplexity': math.exp(min(loss, 50.0)),
      'tokens': float(sums['weight_sum']),
    }

  def summary_table(self, final, unigram) -> list[str]:
    """The end-of-run table: each split's metrics beside its unigram baseline."""
    lines = [f'{"":18s}{"split":>12s}{"loss":>10s}{"accuracy":>10s}{"perplexity":>12s}']
    for split, result in final.items():
      values = (result['loss'], result['accuracy'], result['perplexity'])
      lines.append(
        _row('model', split, values, (10, 10, 12), (4, 4, 3))
        + (f'   bits/dim {result["bits_per_dim"]:.4f}' if 'bits_per_dim' in result else '')
        + (
          f'   per-word perplexity {result["word_perplexity"]:.2f}'
          if 'word_perplexity' in result
          else ''
        )
      )
      if split in unigram:
        base = unigram[split]
        acc = base.get('accuracy')
        acc = f'{acc:10.4f}' if acc is not None else f'{"-":>10s}'
        lines.append(
          f'{"unigram baseline":18s}{split:>12s}{base["cross_entropy"]:10.4f}{acc}'
          f'{base["perplexity"]:12.3f}'
        )
    return lines


class CausalLM(Task):
  """Next-token prediction: logits[t] predict tokens[t + 1] of the same segment."""

  name = 'causal_lm'
  causal = True
  target_offset = 1
  samples = 'text'

  def targets(self, batch, key, evaluating=False):
    del key, evaluating
    return causal_targets(batch)


class ImageAR(Task):
  """Sub-pixels in raster order; the model shifts its input right behind a start token, so
  logits[t] predict tokens[t]. Reports bits per dimension."""

  name = 'image_ar'
  causal = True
  start_token = True
  image = True
  samples = 'image'

  def summary(self, sums):
    out = super().summary(sums)
    out['bits_per_dim'] = out['loss'] / math.log(2.0)
    return out


@dataclasses.dataclass(frozen=True)
class MaskedLM(Task):
  """BERT's masked tokens (`mlm_targets`), bidirectional."""

  name = 'mlm'
  vocab_size: int = 0
  rate: float = 0.15
  mask_id: int = -1
  special_ids: tuple[int, ...] = ()

  def bind(self, model_config, train_config, vocab):
    size = int(model_config.vocab_size)
    ids = (getattr(vocab, name, None) for name in ('pad_id', 'bos_id', 'eos_id', 'mask_id'))
    mask_id = getattr(vocab, 'mask_id', None)
    return MaskedLM(
      vocab_size=size,
      rate=float(train_config.mlm_mask_rate),
      mask_id=int(mask_id) if mask_id is not None else -1,
      special_ids=tuple(sorted({int(i) for i in ids if i is not None and 0 <= int(i) < size})),
    )

  def targets(self, batch, key, evaluating=False):
    return mlm_targets(
      batch,
      key,
      rate=self.rate,
      mask_id=self.mask_id,
      special_ids=self.special_ids,
      vocab_size=self.vocab_size,
      mask_all=evaluating,
    )


class Encoder(Task):
  """An encoder distilled from its softmax original: its hidden states (targets: the
  teacher's, weights: the mask) scored by squared error and cosine similarity, per token
  and per mean-pooled sentence."""

  name = 'encoder'
  needs_teacher = True
  predicts_tokens = False

  def loss_terms(self):
    return (HiddenStateMatch(),)

  def eval_sums(self, out, teacher_out, targets, weights, batch):
    del targets
    sums = cosine_sums(out, teacher_out, weights)
    return {**sums, **sentence_sums(out, teacher_out, weights, batch.get('segment_ids'))}

  def summary(self, sums):
    weight = max(float(sums['weight_sum']), 1.0)
    out = {
      'loss': float(sums['loss_sum']) / weight,
      'cosine': float(sums['cosine_sum']) / weight,
      'tokens': float(sums['weight_sum']),
    }
    if 'sentences' in sums:  # eval: mean-pooled sentence embeddings (sentence_sums)
      out['sentence_cosine'] = float(sums['sentence_cosine_sum']) / max(
        float(sums['sentences']), 1.0
      )
    return out

  def summary_table(self, final, unigram):
    del unigram  # no token baseline for hidden states
    lines = [f'{"":18s}{"split":>12s}{"hidden mse":>12s}{"cosine":>10s}{"sentence cos":>14s}']
    for split, r in final.items():
      values = (r['loss'], r['cosine'], r.get('sentence_cosine', float('nan')))
      lines.append(_row('vs teacher', split, values, (12, 10, 14), (5, 4, 4)))
    return lines


TASKS = {t.name: t for t in (CausalLM(), MaskedLM(), ImageAR(), Encoder())}


def names(**facts) -> tuple[str, ...]:
  """The task names with these facts, e.g. names(samples='text') -> ('causal_lm',)."""
  return tuple(n for n, t in TASKS.items() if all(getattr(t, k) == v for k, v in facts.items()))


def for_run(model_config, train_config, vocab) -> Task:
  """The task of a run (`config.model.task`), bound to its vocabulary: what steps close over."""
  return TASKS[model_config.task].bind(model_config, train_config, vocab)
