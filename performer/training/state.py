"""The typed state of a run: what setup builds and what the loop carries.

`ModelState` is a freshly built (or loaded) model as `models.split` pieces with their
shardings and shapes; `TrainState` is the one pytree a train step reads and writes;
`Teacher` is a frozen original for distillation or attention transfer; `Run` is everything
`build.setup` prepares before the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
  """Everything a train step reads and writes: the step count, the trained parameters
  and their optimizer state, the feature maps' running statistics (`FeatureStats`, which
  train steps update and eval freezes), the random features (`RandomProjection`,
  redrawn by the loop) and the rest of the model's state."""

  step: Any
  params: Any
  opt_state: Any
  stats: Any
  projections: Any
  rest: Any

  @property
  def trees(self):
    """(params, projections, stats, rest): the pieces `nnx.merge` takes after graphdef."""
    return self.params, self.projections, self.stats, self.rest


@dataclasses.dataclass(frozen=True)
class ModelState:
  """A model as `models.split` pieces, placed on the mesh.

  `shardings` and `abstract` map piece names ('params', 'projections', 'stats', 'rest', and
  after `build.setup` 'opt_state') to trees of shardings and of shapes: the names
  checkpoints store them under. `new_params` names the parameters no softmax
  checkpoint has (feature maps, window gains, LoRA factors)."""

  graphdef: Any
  params: Any
  projections: Any
  stats: Any
  rest: Any
  shardings: dict
  abstract: dict
  new_params: tuple = ()

  def train_state(self, step=0, opt_state=None, params=None):
    """The `TrainState` of these pieces (optionally other params) at `step`."""
    return TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=self.params if params is None else params,
      opt_state=opt_state,
      stats=self.stats,
      projections=self.projections,
      rest=self.rest,
    )

  def state_shardings(self, replicated):
    """A `TrainState` of shardings (the step scalar `replicated`)."""
    sh = self.shardings
    return TrainState(
      step=replicated,
      params=sh['params'],
      opt_state=sh.get('opt_state'),
      stats=sh['stats'],
      projections=sh['projections'],
      rest=sh['rest'],
    )


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen softmax original: its pieces go to the step as an argument (never
  donated, never in the optimizer)."""

  graphdef: Any
  trees: tuple  # (params, projections, stats, rest)
  shardings: tuple
  report: dict


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a run needs before its loop (build.setup)."""

  config: Any
  vocab: Any
  mesh: Any
  model: ModelState
  tx: Any
  train_fn: Any  # (TrainState, batch, key) -> (TrainState, metrics)
  eval_fn: Any  # (TrainState, batch, mask_key) -> sums
  redraw_fn: Any
  batch_sharding: Any
  keys: dict  # 'train', 'redraw', 'eval'
  teacher: Teacher | None = None
