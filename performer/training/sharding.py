"""Device mesh, shardings and multi-host setup.

One 3-D mesh ('data', 'fsdp', 'seq') covers plain data parallelism (fsdp=seq=1), fully
sharded data parallelism and context parallelism: the batch is split over 'data' and
'fsdp' (every device of those sees different examples), each parameter along its largest
dimension divisible by the fsdp size, and each sequence along its length over 'seq'
(attention then exchanges only fixed-size states: `performer.attention.context_parallel`).
XLA inserts the other all-gathers and reduce-scatters; the training code never mentions
devices.

Multi-host: `maybe_initialize_distributed()` calls `jax.distributed.initialize()` when the
environment describes more than one process:
  * JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (explicit), or
  * a cluster JAX detects by itself: SLURM (SLURM_JOB_ID with SLURM_NTASKS > 1), Open MPI
    (OMPI_MCA_orte_hnp_uri), Cloud TPU pods (TPU_WORKER_HOSTNAMES with several hosts).
Each process then reads its own shard of the data and the global batch is assembled with
`jax.make_array_from_process_local_data`.
"""

import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

BATCH_AXES = ('data', 'fsdp')


def _distributed_env():
  """Returns initialize() kwargs when the environment asks for multi-process JAX, else None."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS') and env.get('JAX_NUM_PROCESSES'):
    return {
      'coordinator_address': env['JAX_COORDINATOR_ADDRESS'],
      'num_processes': int(env['JAX_NUM_PROCESSES']),
      'process_id': int(env.get('JAX_PROCESS_ID', env.get('JAX_PROCESS_INDEX', '0'))),
    }
  if env.get('SLURM_JOB_ID') and int(env.get('SLURM_NTASKS', '1')) > 1:
    return {}
  if env.get('OMPI_MCA_orte_hnp_uri'):
    return {}
  if len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return {}
  return None


_initialized = False


def maybe_initialize_distributed():
  """Calls jax.distributed.initialize() once if the environment describes several processes."""
  global _initialized
  kwargs = _distributed_env()
  if kwargs is None or _initialized:
    return False
  jax.distributed.initialize(**kwargs)
  _initialized = True
  log.info(
    'jax.distributed: process %d of %d, %d local / %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def make_mesh(mesh_config, devices=None):
  """A ('data', 'fsdp', 'seq') mesh; data=-1 uses every device not taken by fsdp and seq.

  data * fsdp * seq must equal the device count, unless `devices` names the devices
  (tests compare meshes of 1 and 8 devices in one process that way).
  Axes are `Auto` (GSPMD propagation from the shardings we pin): jax 0.10 defaults to
  `Explicit` axes, which would require sharding annotations inside the model code.
  """
  explicit = devices is not None
  devices = list(jax.devices() if devices is None else devices)
  fsdp, seq = int(mesh_config.fsdp), int(mesh_config.get('seq', 1))
  data = int(mesh_config.data)
  if data == -1:
    if len(devices) % (fsdp * seq):
      raise ValueError(
        f'config.mesh: fsdp * seq = {fsdp * seq} does not divide {len(devices)} devices'
      )
    data = len(devices) // (fsdp * seq)
  n = data * fsdp * seq
  if n > len(devices) or (n < len(devices) and not explicit):
    raise ValueError(
      f'config.mesh: data * fsdp * seq = {data} * {fsdp} * {seq} = {n} must equal the '
      f'{len(devices)} devices'
    )
  return jax.make_mesh(
    (data, fsdp, seq),
    ('data', 'fsdp', 'seq'),
    devices=devices[:n],
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
  )


def batch_devices(mesh):
  """How many ways the rows of a batch are split: the product of the batch axes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Rows split over the batch axes and positions over 'seq': the layout of a
  [batch, length, ...] input. `global_batch` gives [batch] leaves the rows' part."""
  return NamedSharding(mesh, P(BATCH_AXES, 'seq'))


def param_spec(shape, fsdp_size):
  """Shards the largest dimension divisible by the fsdp size; otherwise replicates."""
  if fsdp_size <= 1 or not shape:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def param_shardings(mesh, abstract_tree):
  """NamedShardings for a tree of arrays / ShapeDtypeStructs (params or optimizer state)."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(
    lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp_size)), abstract_tree
  )


def replicated_shardings(mesh, abstract_tree):
  return jax.tree.map(lambda _: replicated(mesh), abstract_tree)


def global_batch(batch, sharding):
  """Turns this process's numpy batch into one global jax.Array laid out by `sharding`
  (its spec cut to the leaf's rank, so [batch] leaves split by rows only)."""

  def place(x):
    x = np.asarray(x)
    leaf = NamedSharding(sharding.mesh, P(*sharding.spec[: x.ndim]))
    return jax.make_array_from_process_local_data(leaf, x)

  return jax.tree.map(place, batch)
