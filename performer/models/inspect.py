"""Attention matrices of a model, for analysis and notebooks (not training).

FAVOR+ layers never form the L x L attention matrix; that is the point of
them. To look at it anyway, `capture_attention_inputs` runs the model's own
forward pass with every layer's `attend` function wrapped by a recorder that
keeps the q and k it is called with (after the layer's projections and rotary
positions, exactly what attention sees) together with the layer's random
features. `attention_matrix` then builds the matrix that kind implies:

* softmax: softmax(q k^T / sqrt(d)) under the causal / padding / segment mask;
* feature-map kinds (favor_*, linear_elu): phi(q) phi(k)^T with the true
  feature map (`attention.kernel_features`), masked the same way and divided
  by its row sum -- the matrix the linear-attention output equals A @ v with.
  favor_trig's features can be negative, so its rows may have negative
  entries (the instability the Performer paper points out);
* identity: the identity matrix (attention returns v).

Nothing here changes the model: the wrappers are removed when the call ends.

    logits, maps = inspect.attention_maps(model, tokens, mask=mask)
    maps.shape   # [num_layers, batch, heads, L, L]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from performer import attention


class _Recorder:
  """Stands in for a layer's attend object: records q, k, then delegates."""

  def __init__(self, attend, records):
    self._attend = attend
    self._records = records

  def __call__(self, q, k, v, *, causal, mask=None, segment_ids=None,
               features=None):
    self._records.append({'q': q, 'k': k, 'causal': causal, 'mask': mask,
                          'segment_ids': segment_ids, 'features': features,
                          'kind': self._attend.name})
    return self._attend(q, k, v, causal=causal, mask=mask,
                        segment_ids=segment_ids, features=features)

  def __getattr__(self, name):
    return getattr(self._attend, name)


def _attention_layers(model):
  layers = getattr(model, 'layers', None)
  if layers is None:
    raise ValueError(f'{type(model).__name__} has no .layers: expected a '
                     'performer.models.Transformer')
  out = [getattr(layer, 'attn', None) for layer in layers]
  if any(a is None or not hasattr(a, 'attend') for a in out):
    raise ValueError('every layer needs an .attn with an .attend function')
  return out


def capture_attention_inputs(model, tokens, **call_kwargs):
  """Runs `model(tokens, **call_kwargs)` and records each layer's attention call.

  Returns (logits, records): one dict per layer with 'q', 'k' [B, L, H, D],
  'causal', 'mask', 'segment_ids', 'features' and 'kind'. Run it eagerly
  (not under jit): the recorder swaps attributes on the model for the call.
  """
  layers = _attention_layers(model)
  records, originals = [], [a.attend for a in layers]
  try:
    for a in layers:
      a.attend = _Recorder(a.attend, records)
    logits = model(tokens, **call_kwargs)
  finally:
    for a, original in zip(layers, originals):
      a.attend = original
  if len(records) != len(layers):
    raise RuntimeError(f'recorded {len(records)} attention calls for '
                       f'{len(layers)} layers')
  return logits, records


def _allowed(length, causal, mask, segment_ids, batch):
  """Boolean [B, 1, L, L]: may query i attend to key j."""
  allowed = jnp.ones((batch, 1, length, length), bool)
  if causal:
    allowed &= jnp.tril(jnp.ones((length, length), bool))[None, None]
  if mask is not None:
    allowed &= mask[:, None, None, :] & mask[:, None, :, None]
  if segment_ids is not None:
    allowed &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return allowed


def attention_matrix(kind, q, k, *, causal, mask=None, segment_ids=None,
                     features=None):
  """The [B, H, L, L] attention matrix of `kind` for q, k [B, L, H, D].

  Rows of padded queries (mask False) are zero. See the module docstring for
  what each kind's matrix is.
  """
  batch, length, heads, _ = q.shape
  allowed = _allowed(length, causal, mask, segment_ids, batch)
  if kind == 'identity':
    eye = jnp.broadcast_to(jnp.eye(length, dtype=jnp.float32),
                           (batch, heads, length, length))
    return jnp.where(allowed, eye, 0.0)
  if kind == 'softmax':
    logits = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32),
                        k.astype(jnp.float32)) / np.sqrt(q.shape[-1])
    logits = jnp.where(allowed, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(allowed, jnp.nan_to_num(probs), 0.0)
  if kind not in attention.KINDS:
    raise ValueError(f'unknown attention kind {kind!r}; valid kinds: '
                     f'{", ".join(attention.KINDS)}')
  phi_q = attention.kernel_features(kind, q, features)
  phi_k = attention.kernel_features(kind, k, features)
  scores = jnp.einsum('bqhm,bkhm->bhqk', phi_q, phi_k)
  scores = jnp.where(allowed, scores, 0.0)
  total = jnp.sum(scores, axis=-1, keepdims=True)
  safe = jnp.where(total == 0, 1.0, total)
  return scores / safe


def attention_maps(model, tokens, *, mask=None, segment_ids=None,
                   positions=None):
  """(logits, maps [num_layers, B, H, L, L]) for `model` on `tokens`.

  Uses each layer's own attention kind and stored random features, so the
  maps are those of the model as it runs (deterministic, no dropout).
  """
  logits, records = capture_attention_inputs(
      model, tokens, mask=mask, segment_ids=segment_ids, positions=positions,
      deterministic=True)
  maps = [attention_matrix(r['kind'], r['q'], r['k'], causal=r['causal'],
                           mask=r['mask'], segment_ids=r['segment_ids'],
                           features=r['features'])
          for r in records]
  return logits, jnp.stack(maps)
