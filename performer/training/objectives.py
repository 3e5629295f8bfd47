"""What a step minimises: an objective built from pluggable loss terms.

An objective maps (model pieces, micro-batch, dropout key, teacher pieces) to (loss,
(sums, new statistics)). `Supervised` runs the student once (and the frozen teacher once,
if a term needs it) and adds its terms: the task's cross-entropy, distillation from the
teacher's logits or hidden states, or an encoder's hidden-state match. `AttentionTransfer`
is the first stage of linearizing (convert/attention_transfer.py). A new loss is a new term,
not a branch in the step.

Everything is returned as SUMS (loss, correct, weight, ...) so that micro-batches, devices
and eval batches add up and are divided once: gradient accumulation equals one big batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from performer import models
from performer.attention import FeatureStats
from performer.convert import attention_transfer


def forward(graphdef, trees, inputs, batch, *, dropout_key=None, hidden=False, training=False):
  """The model's outputs (logits, or (logits, final hidden states) with `hidden`) and its
  running statistics after the call. `trees` = (params, features, stats, rest).

  `training` lets feature maps update their statistics and, with a `dropout_key`, turns
  dropout on; eval and the teacher are deterministic with frozen statistics.
  """
  # copy=True: fresh Variables owned by this trace, so reseeding, dropout and statistic
  # updates may mutate them.
  model = nnx.merge(graphdef, *trees, copy=True)
  if training:
    model.set_attributes(use_running_average=False, raise_if_not_found=False)
  if dropout_key is not None:
    # Dropout noise is a function of (seed, step, micro-batch) only, so resuming from a
    # checkpoint replays exactly the same noise.
    nnx.reseed(model, dropout=dropout_key)
  kwargs = dict(
    mask=batch['mask'], segment_ids=batch.get('segment_ids'), deterministic=dropout_key is None
  )
  if not hidden:
    out, _ = model(inputs, **kwargs)
  else:  # one pass for both: the logits and the hidden states sown for the output head
    (logits, _), sown = models.capture_intermediates(model, inputs, **kwargs)
    out = logits, sown['hidden'].astype(jnp.float32)
  return out, nnx.state(model, FeatureStats)


# ------------------------------------------------------------------------------- sums


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


def distill_sum(student, teacher, weights, *, target, temperature):
  """Summed per-token distance from the (frozen) teacher, weighted like the task loss.

  'logits': KL(teacher || student) of the temperature-softened distributions, times T^2
  (Hinton et al.) so its gradient scale does not depend on T. 'hidden': squared error of
  the final hidden states, averaged over the feature dimension.
  """
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  student = student.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  if target == 'hidden':
    per_token = jnp.mean(jnp.square(student - teacher), axis=-1)
  else:
    t_logp = jax.nn.log_softmax(teacher / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(student / temperature, axis=-1)
    per_token = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * temperature**2
  return jnp.sum(per_token * w)


def encoder_sums(student, teacher, weights):
  """An encoder's task: the per-token squared error to the frozen teacher's hidden
  states (as 'loss_sum') and their cosine similarity (as 'correct_sum')."""
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  student = student.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  cosine = jnp.sum(student * teacher, -1) / jnp.maximum(
    jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1), 1e-9
  )
  return {
    'loss_sum': distill_sum(student, teacher, weights, target='hidden', temperature=1.0),
    'correct_sum': jnp.sum(cosine * w),
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


# ------------------------------------------------------------------------------ terms


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
    sums = encoder_sums(student[0], teacher[0], micro['weights'])
    return sums['loss_sum'], sums


@dataclasses.dataclass(frozen=True)
class Distillation:
  """`weight` x the distance to the frozen teacher's logits or final hidden states;
  reported as 'distill_sum' beside the task's loss."""

  weight: float
  target: str  # 'logits' | 'hidden'
  temperature: float = 1.0
  needs_teacher = True

  @property
  def needs_hidden(self):
    return self.target == 'hidden'

  def __call__(self, student, teacher, micro):
    index = 1 if self.target == 'hidden' else 0
    total = distill_sum(
      student[index],
      teacher[index],
      micro['weights'],
      target=self.target,
      temperature=self.temperature,
    )
    return self.weight * total, {'distill_sum': total}


# ------------------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class Supervised:
  """The sum of `terms` on one student pass (and one teacher pass, if a term needs it)."""

  terms: tuple
  teacher_graphdef: Any = None

  def __call__(self, graphdef, trees, micro, dropout_key, teacher=None):
    hidden = any(term.needs_hidden for term in self.terms)
    out, stats = forward(
      graphdef, trees, micro['inputs'], micro, dropout_key=dropout_key, hidden=hidden, training=True
    )
    t_out = None
    if any(term.needs_teacher for term in self.terms):
      t_out, _ = forward(self.teacher_graphdef, teacher, micro['inputs'], micro, hidden=hidden)
    as_tuple = lambda x: x if isinstance(x, tuple) else (x,)
    loss, sums = 0.0, {}
    for term in self.terms:
      term_loss, term_sums = term(as_tuple(out), None if t_out is None else as_tuple(t_out), micro)
      loss, sums = loss + term_loss, {**sums, **term_sums}
    return loss, (sums, stats)


@dataclasses.dataclass(frozen=True)
class AttentionTransfer:
  """Linearizing's first stage: the student's attention modules on the frozen teacher's
  captured layer inputs (statistics update as in training); see attention_transfer.py."""

  teacher_graphdef: Any
  loss: str = 'mse'

  def __call__(self, graphdef, trees, micro, dropout_key, teacher=None):
    del dropout_key
    t_model = nnx.merge(self.teacher_graphdef, *teacher, copy=True)
    kwargs = dict(mask=micro['mask'], segment_ids=micro.get('segment_ids'), deterministic=True)
    _, captured = models.capture_intermediates(t_model, micro['inputs'], **kwargs)
    student = nnx.merge(graphdef, *trees, copy=True)
    student.set_attributes(use_running_average=False, raise_if_not_found=False)
    sums = attention_transfer.transfer_sums(
      student,
      captured,
      micro['mask'],
      micro.get('segment_ids'),
      loss=self.loss,
      weights=micro['weights'],
    )
    return sums['loss_sum'], (sums, nnx.state(student, FeatureStats))


def for_config(task, train_config, teacher_graphdef=None, stage='train'):
  """The objective of a run's `stage` ('transfer' or 'train'): attention transfer, or the
  task's loss plus distillation when the run has a teacher."""
  if stage == 'transfer':
    return AttentionTransfer(teacher_graphdef, train_config.get('transfer_loss', 'mse'))
  if task.name == 'encoder':
    return Supervised((HiddenStateMatch(),), teacher_graphdef)
  terms = (CrossEntropy(),)
  if teacher_graphdef is not None:
    terms += (
      Distillation(
        float(train_config.distill_weight),
        train_config.distill_target,
        float(train_config.distill_temperature),
      ),
    )
  return Supervised(terms, teacher_graphdef)
