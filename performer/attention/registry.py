"""The one table of attention kinds: name -> factory.

Adding a kind is its feature-map file plus one line in ``REGISTRY``; models,
training, checkpoints and importers learn about its variables from their
types (``RandomProjection``, ``FeatureParam``, ``FeatureStats``), never from
its name.

Two ways in:

* ``build(kind, head_dim=, num_heads=, rngs=, **options)`` -> an
  ``nnx.Module`` owning its variables: what models hold.
* ``get_attention(kind, **options)`` -> a plain function of arrays,
  ``attend(q, k, v, *, causal, mask, segment_ids, projection=w)``: the same
  module built around the random matrix ``w`` you pass, every other variable
  at its initial value (Hedgehog at the identity, FAVOR++ without
  statistics, i.e. calibrated on the sequence itself when bidirectional and
  equal to FAVOR+ when causal). For tests, benchmarks and notebooks.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from performer.attention import cached, hybrid, layers, sparse_cache
from performer.attention import projection as projection_lib
from performer.attention.favor_hyperbolic import FavorHyperbolic
from performer.attention.favor_plus_plus import FavorPlusPlus
from performer.attention.favor_relu import FavorRelu
from performer.attention.favor_sharp import FavorSharp
from performer.attention.favor_softmax import FavorSoftmax
from performer.attention.favor_trig import FavorTrig
from performer.attention.feature_map import Options, draw_projection_for
from performer.attention.hedgehog import Hedgehog
from performer.attention.linear_elu import LinearElu


def attention_class(options: Options) -> type[layers.LinearAttention]:
  """The class a feature-map kind builds with ``options``: plain, hybrid (with a
  sparse cache), or (the ``window_off`` ablation with no sinks) plain with the
  hybrid's window gain kept."""
  window = options.window and not options.window_off
  if window and options.sparse_cache:
    return cached.SparseCacheAttention
  if window or options.sinks:
    return hybrid.HybridAttention
  return hybrid.WindowOffAttention if options.window else layers.LinearAttention


@dataclasses.dataclass(frozen=True)
class Kind:
  """How to build one kind: an attention class, or a feature-map class, which
  builds a ``LinearAttention`` or, with exact parts in the options, a
  ``HybridAttention`` (``attention_class``)."""

  attention: type | None = None
  feature_map: type | None = None

  @property
  def uses_projection(self) -> bool:
    return bool(self.feature_map and self.feature_map.uses_projection)

  def build(
    self, name, head_dim, num_heads, options, *, rngs=None, projection=None
  ) -> layers.Attention:
    if self.feature_map is None:
      return self.attention(head_dim, num_heads, options)
    return attention_class(options)(
      self.feature_map, name, head_dim, num_heads, options, rngs=rngs, projection=projection
    )


REGISTRY = {
  'softmax': Kind(layers.SoftmaxAttention),
  'favor_softmax': Kind(feature_map=FavorSoftmax),
  'favor_hyperbolic': Kind(feature_map=FavorHyperbolic),
  'favor_trig': Kind(feature_map=FavorTrig),
  'favor_relu': Kind(feature_map=FavorRelu),
  'linear_elu': Kind(feature_map=LinearElu),
  'favor_plus_plus': Kind(feature_map=FavorPlusPlus),
  'favor_sharp': Kind(feature_map=FavorSharp),
  'hedgehog': Kind(feature_map=Hedgehog),
  'identity': Kind(layers.IdentityAttention),
}
KINDS = tuple(REGISTRY)
OPTIONS = {f.name: f.default for f in dataclasses.fields(Options)}


def make_options(kind: str, **options) -> Options:
  """Validated ``Options`` for ``kind``; unknown names and values raise."""
  if kind not in REGISTRY:
    raise ValueError(f'unknown attention kind {kind!r}; valid kinds: {", ".join(KINDS)}')
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(
      f'unknown attention option(s) {unknown} for {kind!r}; valid options: {", ".join(OPTIONS)}'
    )
  norms = options.get('feature_norms', 'chi')
  if norms not in projection_lib.FEATURE_NORMS:
    raise ValueError(f'feature_norms must be one of {projection_lib.FEATURE_NORMS}, got {norms!r}')
  decay = options.get('stats_decay', 0.99)
  if not 0.0 <= decay < 1.0:
    raise ValueError(f'stats_decay must be in [0, 1), got {decay}')
  window = options.get('window', 0)
  if not isinstance(window, int) or isinstance(window, bool) or window < 0:
    raise ValueError(f'window must be an integer >= 0 (0: no exact window), got {window!r}')
  for name in ('window_off', 'linear_nope', 'sparse_cache_leave_one_out'):
    if not isinstance(options.get(name, False), bool):
      raise ValueError(f'{name} must be True or False, got {options[name]!r}')
  window_off = options.get('window_off', False)
  if window_off and not window:
    raise ValueError('window_off removes the window branch of a hybrid; this attention has none')
  for name, meaning in (
    ('sinks', 'no sinks'),
    ('sparse_cache', 'no sparse cache'),
    ('linear_half_life', 'no decay'),
    ('rope_clamp', 'no clamp'),
  ):
    value = options.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f'{name} must be an integer >= 0 (0: {meaning}), got {value!r}')
  if options.get('sparse_cache', 0) and not window:
    raise ValueError(
      'sparse_cache keeps keys evicted from the window: it needs attention.window > 0'
    )
  cache_dtype = options.get('sparse_cache_dtype', '')
  if cache_dtype not in sparse_cache.STORAGE_DTYPES:
    raise ValueError(
      f"sparse_cache_dtype must be one of {sparse_cache.STORAGE_DTYPES} ('': the state's "
      f'dtype), got {cache_dtype!r}'
    )
  if cache_dtype and not options.get('sparse_cache', 0):
    raise ValueError('sparse_cache_dtype stores the sparse cache: it needs attention.sparse_cache')
  if options.get('sparse_cache_leave_one_out', False) and not options.get('sparse_cache', 0):
    raise ValueError(
      'sparse_cache_leave_one_out scores the sparse cache: it needs attention.sparse_cache'
    )
  if options.get('linear_half_life', 0) and not (window or options.get('sinks', 0)):
    raise ValueError(
      'linear_half_life decays the linear part of a hybrid beside its exact parts: it needs '
      'attention.window or attention.sinks > 0'
    )
  clamp = options.get('rope_clamp', 0)
  if clamp and not options.get('linear_nope', False):
    raise ValueError(
      'rope_clamp scores far sink and cache keys from their unrotated copies, which the '
      'hybrid keeps with attention.linear_nope=True'
    )
  if clamp and not (options.get('sinks', 0) or options.get('sparse_cache', 0)):
    raise ValueError('rope_clamp clamps the sinks and the sparse cache: it needs one of them')
  if clamp and clamp <= window:
    raise ValueError(f'rope_clamp={clamp} must exceed the window ({window}): its keys stay exact')
  return Options(**options)


def build(
  kind: str,
  *,
  head_dim: int,
  num_heads: int,
  rngs: nnx.Rngs | None = None,
  projection=None,
  **options,
) -> layers.Attention:
  """The attention module of ``kind`` for ``num_heads`` heads of ``head_dim``.

  ``rngs.params()`` draws the random matrix of kinds that have one, unless
  ``projection`` gives it.
  """
  return REGISTRY[kind].build(
    kind, head_dim, num_heads, make_options(kind, **options), rngs=rngs, projection=projection
  )


class FunctionalAttention:
  """``attend(q, k, v, *, causal, mask, segment_ids, projection)`` for one kind;
  see the module docstring."""

  def __init__(self, kind: str, **options):
    self.options = make_options(kind, **options)
    self.name = kind
    self.uses_projection = REGISTRY[kind].uses_projection

  def __repr__(self):
    return f'get_attention({self.name!r}, {self.options})'

  def bind(self, head_dim, num_heads, projection=None, rngs=None):
    """The module for these sizes around ``projection`` (a matrix or variable)."""
    if isinstance(projection, nnx.Variable):
      projection = projection[...]
    if not self.uses_projection:  # kinds without random features ignore it
      projection = None
    return REGISTRY[self.name].build(
      self.name, head_dim, num_heads, self.options, rngs=rngs, projection=projection
    )

  def make_projection(self, key, head_dim, num_heads=None):
    """A random matrix [m, d] (or [num_heads, m, d]) for this kind, or None."""
    if not self.uses_projection:
      return None
    return draw_projection_for(self.options, key, head_dim, num_heads)

  def _module(self, q, projection):
    return self.bind(q.shape[-1], q.shape[-2], projection)

  def __call__(
    self,
    q,
    k,
    v,
    *,
    causal,
    mask=None,
    segment_ids=None,
    projection=None,
    linear_qk=None,
    far_q=None,
  ):
    layers.check_inputs(q, k, v, mask, segment_ids)
    return self._module(q, projection)(
      q, k, v, causal=causal, mask=mask, segment_ids=segment_ids, linear_qk=linear_qk, far_q=far_q
    )

  def features(self, q, k, *, causal=False, mask=None, segment_ids=None, projection=None):
    """(phi(q), phi(k)) with their true scale; see LinearAttention.features."""
    return self._module(q, projection).features(
      q, k, causal=causal, mask=mask, segment_ids=segment_ids
    )

  def init_state(
    self,
    batch,
    num_heads,
    head_dim,
    value_dim,
    *,
    projection=None,
    max_length=None,
    dtype=jnp.float32,
  ):
    return self.bind(head_dim, num_heads, projection).init_state(
      batch, value_dim, max_length=max_length, dtype=dtype
    )

  def prefill(self, state, q, k, v, *, projection=None, mask=None, linear_qk=None, far_q=None):
    module = self._module(q, projection)
    return module.prefill(
      state, q, k, v, mask=mask, linear_qk=linear_qk, **layers.far_kwargs(far_q)
    )

  def step(self, state, q, k, v, *, projection=None, mask=None, linear_qk=None, far_q=None):
    module = self._module(q, projection)
    return module.step(state, q, k, v, mask=mask, linear_qk=linear_qk, **layers.far_kwargs(far_q))


def get_attention(kind: str, **options) -> FunctionalAttention:
  """Returns the attention function registered under ``kind``."""
  return FunctionalAttention(kind, **options)
