"""Device meshes and named partitioning, all in one place.

Parameters carry *logical* axis names (``nnx.Param(..., logical_axes=("embed",
"mlp"))``); ``LOGICAL_RULES`` maps them to the mesh axes ``data``, ``fsdp``
and ``tensor``.  Change a rule here and every model, train step and
checkpoint restore follows.

    mesh = make_mesh(data=2, fsdp=2, tensor=2)       # 8 devices
    model = shard_model(model, mesh)                 # params placed per the rules
    batch = jax.device_put(batch, batch_sharding(mesh))
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None: replicated)
LOGICAL_RULES = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "length": None,
    "layers": None,  # the stacked axis of scanned decoder layers
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh; ``-1`` in one axis takes the remaining
    devices; a mesh smaller than the device count uses the first devices."""
    devices = devices if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) > len(devices) or min(sizes) < 1:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} devices, have {len(devices)}")
    devices = list(devices)[: math.prod(sizes)]  # a smaller mesh uses the first devices
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes, mesh: jax.sharding.Mesh | None = None, shape=None) -> P:
    """PartitionSpec for a tuple of logical names; axes whose size does not divide
    evenly by the mesh are left replicated."""
    spec = []
    used = set()
    for i, name in enumerate(logical_axes or ()):
        axis = LOGICAL_RULES.get(name) if name else None
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None and shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def state_shardings(state, mesh: jax.sharding.Mesh):
    """A NamedSharding per leaf of an NNX state, from each Variable's ``logical_axes``."""

    def one(v):
        if isinstance(v, nnx.Variable):
            axes = v.get_metadata().get("logical_axes")
            return v.replace(NamedSharding(mesh, logical_to_spec(axes, mesh, v.get_value().shape)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Place ``model``'s parameters on ``mesh`` following ``LOGICAL_RULES``."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh))
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """``[B, L]`` batch arrays: the batch over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length")))


def constrain(x, logical_axes, mesh: jax.sharding.Mesh):
    """``x`` pinned to the sharding of its logical axes (``jax.lax.with_sharding_constraint``).

    The train step pins the activations to the batch sharding (``("batch",
    "length", "embed")``: rows over ``data`` x ``fsdp``) and the logits to
    ``("batch", "length", "vocab")``; left to itself, XLA may shard them like the
    FSDP-sharded weights they meet and replicate the batch instead.
    """
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, mesh, x.shape)))


def process_rows(sharding: NamedSharding, global_rows: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` row ranges of a ``[global_rows, ...]`` array that this
    process's devices hold under ``sharding``, in order (replicas counted once)."""
    index = sharding.addressable_devices_indices_map((global_rows, 1))
    return sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop) for s in index.values()})


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """A global batch (each field ``[B, ...]``, the same numpy values on every
    process) as global arrays; each process copies only its own rows to its devices
    (``jax.make_array_from_process_local_data``)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        local = np.concatenate([v[a:b] for a, b in process_rows(sharding, v.shape[0])])
        out[k] = jax.make_array_from_process_local_data(sharding, local, v.shape)
    return out
