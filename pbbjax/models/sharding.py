"""The device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names in its ``axes`` metadata (``("layers", "embed", "q_heads",
"head_dim")`` ...); activations are constrained with names of the same kind. ``RULES`` maps each logical
name to zero or more of the mesh axes ``data``, ``fsdp`` and ``tensor``. A dimension that the mapped mesh
axes do not divide is replicated instead, and said so once in the log (e.g. SmolLM2's 3 KV heads on a
``tensor`` axis of 2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Parameters are FSDP-sharded on `embed` and tensor-parallel on heads/mlp/vocab;
# the batch is split over data and fsdp (FSDP is data parallelism with sharded weights).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_vocab": ("tensor",),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
    "norm": (),
    "lora_rank": (),  # a LoRA adapter's small axis; its other axes follow its base weight's
}


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}: "
                f"the other axes' product {known} does not divide {len(devices)}"
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} needs {math.prod(shape)} devices, "
            f"{len(devices)} are available"
        )
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None, rules=None
) -> PartitionSpec:
    """Logical axis names -> PartitionSpec. With shape and mesh, axes that do not divide are dropped."""
    rules = RULES if rules is None else rules
    spec, used = [], set()
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        mesh_axes = tuple(a for a in rules[name] if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            if shape is not None:
                size = math.prod(mesh.shape[a] for a in mesh_axes)
                if shape[i] % size:
                    _warn_replicated(name, shape[i], mesh_axes, size)
                    mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


_warned: set = set()


def _warn_replicated(name, dim, mesh_axes, size):
    key = (name, dim, mesh_axes)
    if key not in _warned:
        _warned.add(key)
        log.warning(
            "logical axis %r of size %d is not divisible by mesh axes %s (size %d): replicated instead",
            name,
            dim,
            mesh_axes,
            size,
        )


def named_sharding(
    mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))


def batch_shards(mesh: Mesh | None) -> int:
    """How many parts the logical ``batch`` axis is split into on ``mesh`` (1 without one)."""
    if mesh is None:
        return 1
    spec = logical_to_spec(("batch",), None, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(mesh.shape[a] for a in axes)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly sharded) array as numpy, on every process. On a pod, an array whose
    shards live on other hosts' devices is gathered (a collective: every process must call this)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
