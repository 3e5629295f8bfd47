"""Attention transfer (LoLCATs stage 1): each layer's linear attention learns to
reproduce that layer's softmax attention, on the softmax teacher's own inputs.

The teacher runs once under `models.capture_intermediates`; every `SelfAttention`
sows its (q, k, v) after the projections and rotary positions (and q, k before
them, which a student with `attention.linear_nope` gives its feature maps), and its
attention output before the output projection. The student's attention module of the
same layer then attends over the teacher's q, k, v, so the loss sees only what the
attention module changes (its feature map, its window gain) and the layers are
trained jointly but independently: one layer's error never reaches the next
layer's input. Nothing is patched; the student never runs its projections.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from performer import attention
from performer.models import layers as model_layers

LOSSES = ('mse', 'xent', 'mse+xent')


def attention_layers(model: nnx.Module) -> dict[str, model_layers.SelfAttention]:
  """{dotted path: SelfAttention} of `model`, e.g. 'layers.3.attn'."""
  return {
    '.'.join(str(p) for p in path): node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, model_layers.SelfAttention)
  }


def _cross_entropy(student_layer, q, k, mask, segment_ids, linear_qk=None):
  """Per-query cross-entropy [B, L] from the teacher's softmax weights to the
  student's (Hedgehog's loss); O(L^2), for short training sequences."""
  attend = student_layer.attend
  teacher = attention.build('softmax', head_dim=q.shape[-1], num_heads=q.shape[2])
  causal = student_layer.causal
  p_t = teacher.weights(q, k, causal=causal, mask=mask, segment_ids=segment_ids)
  p_s = attend.weights(q, k, causal=causal, mask=mask, segment_ids=segment_ids, linear_qk=linear_qk)
  per = -jnp.sum(p_t * jnp.log(jnp.maximum(p_s, 1e-30)), axis=-1)  # [B, H, L]
  return jnp.mean(per, axis=1)


def transfer_sums(
  student: nnx.Module, captured: dict, mask, segment_ids, *, loss='mse', weights=None
):
  """Summed per-token losses over every attention layer of `student` against the
  teacher's `captured` ({path: value} of capture_intermediates).

  'loss_sum': per token, the sum over layers of the mean squared error of the
  attention output (plus, with 'xent', the weight cross-entropy); 'output_cosine_sum':
  the per-token cosine of student and teacher outputs, averaged over layers (logged as
  'output_cosine'); 'weight_sum': the real tokens, or the task's `weights` when given (so the
  train step's per-token averages match its other metrics).
  """
  if loss not in LOSSES:
    raise ValueError(f'transfer loss must be one of {LOSSES}, got {loss!r}')
  layers = attention_layers(student)
  if not layers:
    raise ValueError('attention transfer: the student has no SelfAttention layers')
  first = captured[f'{next(iter(layers))}.qkv'][0]
  w = jnp.ones(first.shape[:2]) if mask is None else mask
  w = (w if weights is None else weights).astype(jnp.float32)
  per_token = cosine = 0.0
  for path, layer in layers.items():
    q, k, v = (jax.lax.stop_gradient(x) for x in captured[f'{path}.qkv'])
    linear_qk, far = layer.captured_linear_qk(captured, path), {}  # the teacher's, unrotated
    if linear_qk is not None:
      linear_qk = tuple(jax.lax.stop_gradient(x) for x in linear_qk)
      far = layer.far_query(linear_qk[0])  # with attention.rope_clamp
    target = jax.lax.stop_gradient(captured[f'{path}.attended']).astype(jnp.float32)
    out = layer.attend(
      q, k, v, causal=layer.causal, mask=mask, segment_ids=segment_ids, linear_qk=linear_qk, **far
    )
    out = out.astype(jnp.float32)
    if 'mse' in loss.split('+'):
      per_token = per_token + jnp.mean(jnp.square(out - target), axis=(-2, -1))
    if 'xent' in loss.split('+'):
      per_token = per_token + _cross_entropy(layer, q, k, mask, segment_ids, linear_qk)
    dot = jnp.sum(out * target, axis=(-2, -1))
    norms = jnp.linalg.norm(out, axis=(-2, -1)) * jnp.linalg.norm(target, axis=(-2, -1))
    cosine = cosine + dot / jnp.maximum(norms, 1e-9)
  return {
    'loss_sum': jnp.sum(per_token * w),
    'output_cosine_sum': jnp.sum(cosine / len(layers) * w),
    'weight_sum': jnp.sum(w),
  }
