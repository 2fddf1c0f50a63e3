"""The device mesh: axes `data`, `fsdp`, `tensor`, sized from config (-1 = the rest)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Mesh axis sizes in MESH_AXES order, with at most one -1 standing for the rest.

    Raises ValueError naming the sizes when they cannot tile `num_devices`.
    """
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}; mesh axes: {', '.join(MESH_AXES)}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape, strict=True))}"
        )
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(
            f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape, strict=True))}"
        )
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, shape, strict=True))} does not divide {num_devices} devices"
            )
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} devices, "
            f"{num_devices} are available"
        )
    return tuple(shape)


def make_mesh(
    sizes: Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    *,
    physical_layout: bool = False,
) -> Mesh:
    """A Mesh over `devices` (default: all) with Auto axis types (jax 0.10 defaults to Explicit).

    With every device, `jax.make_mesh` lays the axes out along the physical topology (the
    `tensor` and `fsdp` axes on the fastest links); an explicit device list is used as given,
    or with `physical_layout` laid out along its topology too (e.g. the devices of a TPU
    topology description that are not this process's backend).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if physical_layout:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def describe_mesh(mesh: Mesh) -> str:
    """'data=4 fsdp=2 tensor=1 on 8 cpu devices (TFRT_CPU_0, ...)', for logs."""
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    return f"{axes} on {mesh.devices.size} devices ({', '.join(kinds)})"
