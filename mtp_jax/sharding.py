"""Device meshes (single- and multi-host grids) and logical-axis sharding rules (t5x/MaxText style, rules as config data).

Parameters carry logical axis names ("embed", "mlp", "vocab", ...). `MeshConfig.rules` maps
each logical name to mesh axes; everything not named is replicated. Activations are
constrained at a few chosen points through `constrain`, a no-op outside `activate`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtp_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
Axes = Sequence[str | None]

_ACTIVE: list[tuple[Mesh, dict[str, tuple[str, ...]]]] = []


def mesh_shape(mcfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Resolves -1 and checks that data x fsdp x tensor (times DCN sizes) equals the device count."""
    dims = [mcfg.data * mcfg.dcn_data, mcfg.fsdp * mcfg.dcn_fsdp, mcfg.tensor]
    names = "mesh data={} x fsdp={} x tensor={}".format(mcfg.data, mcfg.fsdp, mcfg.tensor)
    if mcfg.dcn_data * mcfg.dcn_fsdp > 1:
        names += f" (dcn_data={mcfg.dcn_data}, dcn_fsdp={mcfg.dcn_fsdp})"
    free = [i for i, (v, name) in enumerate(zip((mcfg.data, mcfg.fsdp, mcfg.tensor), MESH_AXES)) if v == -1]
    if len(free) > 1:
        raise ConfigError(f"{names}: only one mesh axis may be -1; give explicit sizes for the others")
    for v, name in zip((mcfg.data, mcfg.fsdp, mcfg.tensor), MESH_AXES):
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{name}={v} must be a positive size or -1 (the rest of the devices)")
    if free:
        known = math.prod(d for i, d in enumerate(dims) if i not in free)
        dcn = (mcfg.dcn_data, mcfg.dcn_fsdp, 1)[free[0]]
        if device_count % (known * dcn):
            raise ConfigError(
                f"{names} cannot fill {device_count} devices ({device_count} is not divisible by {known * dcn}); "
                f"choose sizes whose product divides {device_count}"
            )
        dims[free[0]] = device_count // known
    if math.prod(dims) != device_count:
        raise ConfigError(
            f"{names} needs {math.prod(dims)} devices but {device_count} are available; "
            f"set mesh.data=-1 or sizes whose product is {device_count}"
        )
    return tuple(dims)  # type: ignore[return-value]


def make_mesh(mcfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh with Auto axes, so XLA propagates unconstrained shardings."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mcfg, len(devices))
    spans_hosts = devices == jax.devices() and (mcfg.dcn_data > 1 or mcfg.dcn_fsdp > 1 or jax.process_count() > 1)
    if spans_hosts or devices[0].platform == "tpu":  # a TPU slice (or a topology compiled for): physical layout
        grid = make_device_grid(mcfg, devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def make_device_grid(mcfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> np.ndarray:
    """All devices arranged [dcn_data*data, dcn_fsdp*fsdp, tensor]; DCN factors span slices or processes.

    Within a slice/host the layout follows the physical interconnect (create_device_mesh); across them
    only the dcn_* factors cross the slow network (create_hybrid_device_mesh).
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mcfg, len(devices))  # resolves -1; ConfigError unless the sizes multiply to len(devices)
    dcn = (mcfg.dcn_data, mcfg.dcn_fsdp, 1)
    if math.prod(dcn) == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
    granules = _group(devices, "slice_index" if by_slice else "process_index")
    unit = "slices" if by_slice else "processes"
    if len(granules) % math.prod(dcn):
        raise ConfigError(
            f"mesh dcn_data={mcfg.dcn_data} x dcn_fsdp={mcfg.dcn_fsdp} = {math.prod(dcn)} does not divide the "
            f"{len(granules)} {unit} of this run; set mesh.dcn_data x mesh.dcn_fsdp to a divisor of {len(granules)}"
        )
    ici = tuple(size // d for size, d in zip(shape, dcn))
    if len(granules) == math.prod(dcn):
        return mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=not by_slice, allow_split_physical_axes=True
        )
    return _grouped_hybrid_grid(ici, dcn, granules)


def _grouped_hybrid_grid(ici: tuple[int, ...], dcn: tuple[int, ...], granules: list[list[Any]]) -> np.ndarray:
    """Several processes per DCN unit (e.g. one process per GPU): consecutive processes share a node."""
    per_group = len(granules) // math.prod(dcn)
    groups = [sum(granules[i : i + per_group], []) for i in range(0, len(granules), per_group)]
    blocks = np.empty(dcn, dtype=object)
    for index, group in zip(np.ndindex(*dcn), groups):
        blocks[index] = mesh_utils.create_device_mesh(ici, group, allow_split_physical_axes=True)
    return np.block(blocks.tolist())


def _group(devices: list[Any], attr: str) -> list[list[Any]]:
    keys = sorted({getattr(d, attr) for d in devices})
    return [[d for d in devices if getattr(d, attr) == k] for k in keys]


def rules_dict(rules: list) -> dict[str, tuple[str, ...]]:
    out = {}
    for logical, axes in rules:
        axes = [axes] if isinstance(axes, str) else list(axes)
        for a in axes:
            if a not in MESH_AXES:
                raise ConfigError(f"mesh.rules maps '{logical}' to unknown mesh axis '{a}'; use one of {MESH_AXES}")
        out[logical] = tuple(axes)
    return out


def logical_to_spec(axes: Axes, rules: dict[str, tuple[str, ...]]) -> P:
    """Maps logical names to a PartitionSpec; a mesh axis is used at most once per array."""
    used: set[str] = set()
    spec: list[Any] = []
    for name in axes:
        mesh_axes = tuple(a for a in rules.get(name, ()) if a not in used) if name else ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[n] for n in names)


def param_shardings(
    abstract: Any, axes_tree: Any, mesh: Mesh, rules: dict[str, tuple[str, ...]]
) -> Any:
    """NamedSharding for every parameter; refuses a mesh that does not divide a dimension."""

    def one(path: tuple, leaf: jax.ShapeDtypeStruct, axes: Axes) -> NamedSharding:
        spec = logical_to_spec(axes, rules)
        for dim, entry, name in zip(leaf.shape, spec, axes):
            size = axis_size(mesh, entry)
            if dim % size:
                where = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(
                    f"parameter {where} dimension '{name}'={dim} is not divisible by mesh axes {entry} of size {size}; "
                    f"change the model size or the mesh"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", None), rules))


def check_batch(batch_size: int, mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> None:
    size = axis_size(mesh, logical_to_spec(("batch",), rules)[0])
    if batch_size % size:
        raise ConfigError(
            f"train.batch_size={batch_size} (per micro-batch) is not divisible by the {size} batch-parallel devices; "
            f"use a multiple of {size}"
        )


def unsharded_fraction(shardings: Any, abstract: Any) -> float:
    """Fraction of parameter bytes that are fully replicated (MaxText's guard against forgotten rules)."""
    total = replicated = 0
    for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
        nbytes = math.prod(a.shape) * a.dtype.itemsize
        total += nbytes
        if all(e is None for e in s.spec):
            replicated += nbytes
    return replicated / max(total, 1)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> Iterator[None]:
    """Makes `constrain` effective while tracing under this mesh."""
    _ACTIVE.append((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active() -> tuple[Mesh, dict[str, tuple[str, ...]]] | None:
    """The mesh and rules being traced under (`activate`), None outside."""
    return _ACTIVE[-1] if _ACTIVE else None


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Pins an activation's sharding by logical names; no-op when no mesh is active."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))
