"""Context parallelism: one sequence split over the mesh's ``seq`` axis.

Linear attention's causal state after any prefix is a fixed-size (S, z, M) per
head, so a sequence cut into P contiguous spans, one per device, needs only
those states to cross devices (LASP-2, Sun et al. 2025): each device reduces
its span to a state, one all-gather shares the P states, a fold gives each
device the state entering its span, and the local chunked pass continues from
it (``linear.causal_chunked(axis_name=...)``). The traffic per layer is P
states, independent of the length. Bidirectional attention sums (Z, z) across
devices under a shift every device shares.

Exact softmax has no such state: under ``seq`` each device all-gathers K and V
(and the masks) and attends with its own queries at their global positions, so
its memory still grows with the full length. Ring attention would overlap that
traffic with compute; it is not built.

Models never see any of this. A training or decoding program is traced inside
``sequence_parallel(mesh)``; attention modules then run their pure cores under
``jax.shard_map`` with the length axis split over ``seq``. Everything else
(projections, feature maps, MLPs, positions from global indices) stays in
GSPMD's hands, sharded along the length by propagation.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

SEQ_AXIS = 'seq'
REPLICATED = 'replicated'  # an `over_length` argument every device sees whole
BATCH_AXES = ('data', 'fsdp')

_MESH = contextvars.ContextVar('performer_sequence_mesh', default=None)


@contextlib.contextmanager
def sequence_parallel(mesh):
  """Attention traced inside splits the length axis over ``mesh``'s ``seq`` axis
  (nothing changes when the mesh is None or its ``seq`` axis has size 1)."""
  size = 1 if mesh is None else dict(mesh.shape).get(SEQ_AXIS, 1)
  token = _MESH.set(mesh if size > 1 else None)
  try:
    yield
  finally:
    _MESH.reset(token)


def active():
  return _MESH.get() is not None


def _batch_spec(mesh, batch):
  """The mesh's batch axes, or None (replicated) when they do not divide `batch`."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else None


def _spec(batch_axes, length_axis):
  if length_axis == REPLICATED:
    return P()
  if length_axis is None:
    return P(batch_axes)
  spec = [None] * (length_axis + 1)
  spec[0], spec[length_axis] = batch_axes, SEQ_AXIS
  return P(*spec)


def over_length(fn, args, in_axes, out_axes):
  """``fn(*args, axis_name=...)`` with every argument's length axis split over
  ``seq``. ``in_axes``: an int per argument, None for one without a length axis
  (a carried state), REPLICATED for one without a batch axis either; ``out_axes``
  likewise for the outputs (a tuple, or one entry for a single output). Outside
  ``sequence_parallel`` it is ``fn(*args, axis_name=None)``. Arguments that are
  None are passed through as None."""
  mesh = _MESH.get()
  if mesh is None:
    return fn(*args, axis_name=None)
  present = [i for i, a in enumerate(args) if a is not None]
  first = args[present[0]]
  length = first.shape[in_axes[present[0]]]
  devices = mesh.shape[SEQ_AXIS]
  if length % devices:
    raise ValueError(f'sequence length {length} is not divisible by mesh.seq={devices}')
  batch_axes = _batch_spec(mesh, first.shape[0])

  def body(*present_args):
    full = list(args)
    for i, a in zip(present, present_args):
      full[i] = a
    return fn(*full, axis_name=SEQ_AXIS)

  in_specs = tuple(_spec(batch_axes, in_axes[i]) for i in present)
  if isinstance(out_axes, tuple):
    out_specs = tuple(_spec(batch_axes, a) for a in out_axes)
  else:
    out_specs = _spec(batch_axes, out_axes)
  # check_vma=False: the cores' scans start from device-invariant carries; what is
  # replicated on output (a carried state) comes from all-gathered values only.
  sharded = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return sharded(*(args[i] for i in present))


def gathered_softmax(q, k, v, *, causal, mask, segment_ids, attend):
  """Exact attention under ``seq``: K, V and the key masks all-gathered, queries
  local at their global positions. ``attend(q, k, v, allowed)`` is the softmax
  itself (``softmax.attend_masked``)."""
  b, length = q.shape[:2]
  mask = jnp.ones((b, length), bool) if mask is None else mask
  seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids

  def local(q, k, v, mask, seg, axis_name):
    gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
    keys, values, key_mask, key_seg = gather(k), gather(v), gather(mask), gather(seg)
    q_pos = jax.lax.axis_index(axis_name) * q.shape[1] + jnp.arange(q.shape[1])
    allowed = key_mask[:, None, None, :] & (seg[:, None, :, None] == key_seg[:, None, None, :])
    if causal:
      allowed &= (q_pos[:, None] >= jnp.arange(keys.shape[1])[None, :])[None, None]
    return attend(q, keys, values, allowed)

  return over_length(local, (q, k, v, mask, seg), (1, 1, 1, 1, 1), 1)
