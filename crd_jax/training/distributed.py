"""Devices: a one-axis data-parallel mesh over every device JAX sees, single- or multi-host.

Parameters and optimizer state are replicated; the batch is split along its first axis over the ``data``
axis. Multi-host runs call :func:`initialize` (``jax.distributed.initialize``) before anything touches a
device; on CPU hosts the cross-process collectives go through gloo.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

if TYPE_CHECKING:
    import ml_collections

    from crd_jax.typing import PyTree

DATA = "data"


def initialize(cfg: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` from ``config.distributed`` or the environment.

    ``cfg.coordinator_address`` empty and no ``JAX_COORDINATOR_ADDRESS`` in the environment: single process,
    unless the process is one of several tasks of a Slurm job step (``SLURM_NTASKS > 1``, e.g. ``srun -n 4
    python train.py ...``): then ``jax.distributed.initialize()`` without arguments, which reads the coordinator,
    the process count and this process's rank from Slurm's variables.
    """
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not address:
        if under_slurm():
            _cpu_collectives()
            jax.distributed.initialize()
        return
    num_processes = int(cfg.num_processes or os.environ.get("JAX_NUM_PROCESSES", 1))
    process_id = int(cfg.process_id if cfg.process_id >= 0 else os.environ.get("JAX_PROCESS_ID", 0))
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)


def under_slurm() -> bool:
    """One task of several in a Slurm job step (``srun -n N``, ``N > 1``)."""
    try:
        return bool(os.environ.get("SLURM_JOB_ID")) and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def _cpu_collectives() -> None:
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def global_batch(mesh: Mesh, local: dict) -> dict:
    """The global batch array from this process's slots (each process holds its own shard)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicate(mesh: Mesh, tree: PyTree) -> PyTree:
    """Puts a pytree on every device: host values (identical on every process) are copied, arrays that
    are already replicated over ``mesh`` pass through."""
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


def to_host(tree: PyTree) -> PyTree:
    """A replicated device pytree as numpy (the local copy)."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x), tree
    )
