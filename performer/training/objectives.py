"""What a step minimises: an objective built from pluggable loss terms.

An objective maps (model pieces, micro-batch, dropout key, teacher pieces) to (loss,
(sums, new statistics)). `Supervised` runs the student once (and the frozen teacher once,
if a term needs it) and adds its terms: the task's own (tasks.py: cross-entropy, or an
encoder's hidden-state match) and distillation from the teacher's logits or hidden states.
`AttentionTransfer` is the first stage of linearizing (convert/attention_transfer.py). A new
loss is a new term, not a branch in the step.

Everything is returned as SUMS (loss, correct, weight, ...) so that micro-batches, devices
and eval batches add up and are divided once: gradient accumulation equals one big batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from performer import models
from performer.attention import FeatureStats
from performer.convert import attention_transfer


def forward(graphdef, trees, inputs, batch, *, dropout_key=None, hidden=False, training=False):
  """The model's outputs (logits, or (logits, final hidden states) with `hidden`) and its
  running statistics after the call. `trees` = (params, projections, stats, rest).

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


# ------------------------------------------------------------------------ distillation


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
  task's loss terms plus distillation when the run has a teacher its task does not use."""
  if stage == 'transfer':
    return AttentionTransfer(teacher_graphdef, train_config.get('transfer_loss', 'mse'))
  terms = task.loss_terms()
  if teacher_graphdef is not None and not task.needs_teacher:
    terms += (
      Distillation(
        float(train_config.distill_weight),
        train_config.distill_target,
        float(train_config.distill_temperature),
      ),
    )
  return Supervised(terms, teacher_graphdef)
