"""Attention matrices of a model, for analysis and notebooks (not training).

FAVOR+ layers never form the L x L attention matrix; that is the point of
them. To look at it anyway, `capture_attention_inputs` runs the model's own
forward pass with every layer's `attend` module wrapped by a recorder that
keeps the q and k it is called with (after the layer's projections and rotary
positions, exactly what attention sees) together with the module itself, whose
`weights` method then builds the matrix its kind implies, with the layer's
own random features, learned parameters and statistics:

* softmax: softmax(q k^T / sqrt(d)) under the causal / padding / segment mask;
* feature-map kinds: phi(q) phi(k)^T with the true, calibrated feature map
  (`LinearAttention.features`), masked the same way and divided by its row
  sum -- the matrix the linear-attention output equals A @ v with.
  favor_trig's features can be negative, so its rows may have negative
  entries (the instability the Performer paper points out);
* identity: the identity matrix (attention returns v).

Nothing here changes the model: the wrappers are removed when the call ends.

    logits, maps = inspect.attention_maps(model, tokens, mask=mask)
    maps.shape   # [num_layers, batch, heads, L, L]
"""

from __future__ import annotations

import jax.numpy as jnp

from performer import attention


class _Recorder:
  """Stands in for a layer's attend module: records q, k, then delegates."""

  def __init__(self, attend, records):
    self._attend = attend
    self._records = records

  def __call__(self, q, k, v, *, causal, mask=None, segment_ids=None):
    self._records.append(
      {
        'q': q,
        'k': k,
        'causal': causal,
        'mask': mask,
        'segment_ids': segment_ids,
        'attend': self._attend,
        'kind': self._attend.name,
      }
    )
    return self._attend(q, k, v, causal=causal, mask=mask, segment_ids=segment_ids)

  def __getattr__(self, name):
    return getattr(self._attend, name)


def _attention_layers(model):
  layers = getattr(model, 'layers', None)
  if layers is None:
    raise ValueError(
      f'{type(model).__name__} has no .layers: expected a performer.models.Transformer'
    )
  out = [getattr(layer, 'attn', None) for layer in layers]
  if any(a is None or not hasattr(a, 'attend') for a in out):
    raise ValueError('every layer needs an .attn with an .attend function')
  return out


def capture_attention_inputs(model, tokens, **call_kwargs):
  """Runs `model(tokens, **call_kwargs)` and records each layer's attention call.

  Returns (logits, records): one dict per layer with 'q', 'k' [B, L, H, D],
  'causal', 'mask', 'segment_ids', 'attend' (the module) and 'kind'. Run it eagerly
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
    raise RuntimeError(f'recorded {len(records)} attention calls for {len(layers)} layers')
  return logits, records


def attention_matrix(kind, q, k, *, causal, mask=None, segment_ids=None, features=None, **options):
  """The [B, H, L, L] attention matrix of `kind` for q, k [B, L, H, D], with
  the random matrix `features` and every other variable at its initial value
  (see `attention.get_attention`). Rows of padded queries are zero."""
  module = attention.get_attention(kind, **options).bind(q.shape[-1], q.shape[-2], features)
  return module.weights(q, k, causal=causal, mask=mask, segment_ids=segment_ids)


def attention_maps(model, tokens, *, mask=None, segment_ids=None, positions=None):
  """(logits, maps [num_layers, B, H, L, L]) for `model` on `tokens`.

  Uses each layer's own attention module (random features, learned
  parameters, statistics), so the maps are those of the model as it runs
  (deterministic, no dropout).
  """
  logits, records = capture_attention_inputs(
    model, tokens, mask=mask, segment_ids=segment_ids, positions=positions, deterministic=True
  )
  maps = [
    r['attend'].weights(
      r['q'], r['k'], causal=r['causal'], mask=r['mask'], segment_ids=r['segment_ids']
    )
    for r in records
  ]
  return logits, jnp.stack(maps)
