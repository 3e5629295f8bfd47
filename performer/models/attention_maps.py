"""Attention matrices of a model, for analysis and notebooks (not training).

FAVOR layers never form the L x L attention matrix; that is the point of them.
To look at it anyway, `capture_attention_inputs` runs the model's own forward
pass under Flax's `nnx.capture`, which collects the q, k, v every attention
layer sows (after its projections and rotary positions: exactly what the
attention module sees). Each layer's module then builds the matrix its kind
implies, with the layer's own random features, learned parameters and
statistics (`Attention.weights`):

* softmax: softmax(q k^T / sqrt(d)) under the causal / padding / segment mask;
* feature-map kinds: phi(q) phi(k)^T with the true, calibrated feature map
  (`LinearAttention.features`), masked the same way and divided by its row
  sum -- the matrix the linear-attention output equals A @ v with.
  favor_trig's features can be negative, so its rows may have negative
  entries (the instability the Performer paper points out);
* identity: the identity matrix (attention returns v).

Capturing stores nothing on the model and works under jit.

    logits, maps = attention_maps.attention_maps(model, tokens, mask=mask)
    maps.shape   # [num_layers, batch, heads, L, L]
"""

from __future__ import annotations

import jax.numpy as jnp

from performer import attention
from performer.models.layers import SelfAttention, capture_intermediates


def _attention_layers(model):
  layers = getattr(model, 'layers', None)
  if layers is None:
    raise ValueError(f'{type(model).__name__} has no .layers: expected a performer model')
  out = [getattr(layer, 'attn', None) for layer in layers]
  if any(not isinstance(a, SelfAttention) for a in out):
    raise ValueError('every layer needs an .attn that is a layers.SelfAttention')
  return out


def capture_attention_inputs(model, tokens, *, mask=None, segment_ids=None, **call_kwargs):
  """Runs `model(tokens, ...)` under `nnx.capture` and returns (outputs, records):
  one dict per layer with 'q', 'k', 'v' (k, v with the layer's kv heads), 'causal',
  'mask', 'segment_ids', 'attend' (the layer's attention module) and 'linear_qk'
  (what its feature map sees, when not q, k: `attention.linear_nope`)."""
  layers = _attention_layers(model)
  (outputs, _), sown = capture_intermediates(
    model, tokens, mask=mask, segment_ids=segment_ids, **call_kwargs
  )
  records = []
  for i, layer in enumerate(layers):
    q, k, v = sown[f'layers.{i}.attn.qkv']
    records.append(
      {
        'q': q,
        'k': k,
        'v': v,
        'causal': layer.causal,
        'mask': None if mask is None else jnp.asarray(mask, bool),
        'segment_ids': segment_ids,
        'attend': layer.attend,
        'linear_qk': layer.captured_linear_qk(sown, f'layers.{i}.attn'),
      }
    )
  return outputs, records


def attention_matrix(
  kind, q, k, *, causal, mask=None, segment_ids=None, projection=None, **options
):
  """The [B, H, L, L] attention matrix of `kind` for q, k [B, L, H, D], with
  the random matrix `projection` and every other variable at its initial value
  (see `attention.get_attention`). Rows of padded queries are zero."""
  module = attention.get_attention(kind, **options).bind(q.shape[-1], q.shape[-2], projection)
  return module.weights(q, k, causal=causal, mask=mask, segment_ids=segment_ids)


def attention_maps(model, tokens, *, mask=None, segment_ids=None, positions=None):
  """(outputs, maps [num_layers, B, H, L, L]) for `model` on `tokens`.

  Uses each layer's own attention module (random features, learned
  parameters, statistics), so the maps are those of the model as it runs
  (deterministic, no dropout).
  """
  outputs, records = capture_attention_inputs(
    model, tokens, mask=mask, segment_ids=segment_ids, positions=positions, deterministic=True
  )
  maps = [
    r['attend'].weights(
      r['q'],
      r['k'],
      causal=r['causal'],
      mask=r['mask'],
      segment_ids=r['segment_ids'],
      linear_qk=r['linear_qk'],
    )
    for r in records
  ]
  return outputs, jnp.stack(maps)
