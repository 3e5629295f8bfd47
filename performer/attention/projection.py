"""Random feature matrices for FAVOR+ and the variable type that stores them.

Orthogonal random features (ORFs) lower the variance of the softmax-kernel
estimate (Performer paper, Thm. 2). Rows come in blocks of ``head_dim`` exactly
orthogonal directions, each block the Q factor of a Gaussian matrix with the
sign fix Q * sign(diag R) so that Q is Haar-distributed. Row norms are redrawn
independently as chi(d) (so each row is marginally Gaussian, keeping the
estimator unbiased) or fixed to sqrt(d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FEATURE_NORMS = ('chi', 'sqrt')


class RandomProjection(nnx.Variable):
  """A random projection matrix [m, d] (or [heads, m, d]).

  Not an ``nnx.Param``: the optimizer never sees it, it gets no gradient and no
  weight decay. The training loop redraws it on a schedule; it is checkpointed
  so evaluation and sampling are deterministic. Draw options are kept as
  variable metadata so :func:`redraw_projections` can reproduce the distribution.
  """


def _orthogonal_block(key: jax.Array, dim: int) -> jax.Array:
  """A Haar-random orthogonal [dim, dim] matrix: Gram-Schmidt of a Gaussian matrix.

  Gram-Schmidt gives the Q of the QR factorisation whose R has a positive diagonal,
  which is exactly Haar-distributed (no sign fix needed). It is written with plain
  XLA ops rather than `jnp.linalg.qr`: XLA:CPU runs independent LAPACK custom calls
  concurrently on its small thread pool, and a model with many layers' worth of them
  in one jitted init (8+ layers on a 2-core machine) deadlocked there. Projections
  are applied twice ("twice is enough"), which keeps float32 columns orthogonal to
  ~1e-6 for the dims used here.
  """
  gaussian = jax.random.normal(key, (dim, dim), jnp.float32)
  earlier = jnp.arange(dim)

  def column(j, q):
    v = q[:, j]
    for _ in range(2):
      coeffs = jnp.where(earlier < j, q.T @ v, 0.0)
      v = v - q @ coeffs
    return q.at[:, j].set(v / jnp.linalg.norm(v))

  return jax.lax.fori_loop(0, dim, column, gaussian)


def draw_projection(
  key: jax.Array,
  num_features: int,
  head_dim: int,
  *,
  orthogonal: bool = True,
  feature_norms: str = 'chi',
  num_heads: int | None = None,
) -> jax.Array:
  """Draws a feature matrix w of shape [m, d], or [num_heads, m, d].

  Args:
    key: PRNG key.
    num_features: m, the number of random features.
    head_dim: d, the query/key dimension.
    orthogonal: stack orthogonal blocks (True) or use iid Gaussian rows.
    feature_norms: 'chi' draws row norms from chi(d) with an independent key;
      'sqrt' fixes every row norm to sqrt(d). Only used when orthogonal.
    num_heads: if given, draw an independent matrix per head.
  """
  if num_features <= 0 or head_dim <= 0:
    raise ValueError(
      f'num_features and head_dim must be positive, got '
      f'num_features={num_features}, head_dim={head_dim}'
    )
  if feature_norms not in FEATURE_NORMS:
    raise ValueError(f'feature_norms must be one of {FEATURE_NORMS}, got {feature_norms!r}')
  if num_heads is not None:
    keys = jax.random.split(key, num_heads)
    return jax.vmap(
      lambda k: draw_projection(
        k, num_features, head_dim, orthogonal=orthogonal, feature_norms=feature_norms
      )
    )(keys)
  if not orthogonal:
    return jax.random.normal(key, (num_features, head_dim), jnp.float32)
  block_key, norm_key = jax.random.split(key)
  num_blocks = -(-num_features // head_dim)
  blocks = jax.vmap(_orthogonal_block, in_axes=(0, None))(
    jax.random.split(block_key, num_blocks), head_dim
  )
  directions = blocks.reshape(num_blocks * head_dim, head_dim)[:num_features]
  if feature_norms == 'sqrt':
    norms = jnp.full((num_features,), jnp.sqrt(float(head_dim)), jnp.float32)
  else:
    norms = jnp.linalg.norm(
      jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1
    )
  # Rows of Q are unit vectors; scale each to its drawn norm.
  return directions * norms[:, None]


def _is_random_features(x) -> bool:
  return isinstance(x, RandomProjection)


def redraw_projections(state, key: jax.Array):
  """Returns ``state`` with every RandomProjection matrix freshly drawn.

  ``state`` is any pytree whose leaves include RandomProjection variables (e.g.
  the RandomProjection part of ``nnx.split``). Each variable gets its own key
  folded from its position in the tree, so the result depends only on ``key``
  and the tree structure: restarts reproduce it. Shape and draw options
  (stored as metadata) are preserved. Works under ``jax.jit``.
  """
  leaves, treedef = jax.tree.flatten(state, is_leaf=_is_random_features)
  new_leaves = []
  for index, leaf in enumerate(leaves):
    if not _is_random_features(leaf):
      new_leaves.append(leaf)
      continue
    meta = leaf.get_metadata()
    value = leaf[...]
    num_heads = value.shape[0] if value.ndim == 3 else None
    fresh = draw_projection(
      jax.random.fold_in(key, index),
      value.shape[-2],
      value.shape[-1],
      orthogonal=meta.get('orthogonal', True),
      feature_norms=meta.get('feature_norms', 'chi'),
      num_heads=num_heads,
    ).astype(value.dtype)
    new_leaves.append(leaf.replace(fresh))
  return jax.tree.unflatten(treedef, new_leaves)
