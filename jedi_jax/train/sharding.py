"""Device mesh and parameter/batch shardings, with the logical-axis rules held as config DATA.

Style of MaxText/MaxDiffusion: every parameter gets *logical* axis names from its kind and shape,
and a list of rules maps logical names to mesh axes:

    mesh:  axes ('data', 'fsdp'), shape (2, 4)         (-1 = fill with the remaining devices)
    rules: [('batch', ('data', 'fsdp')),               # batch dim split over every device
            ('embed', 'fsdp'), ('mlp', None),          # linear kernel (in, out): FSDP over `in`
            ('conv_in', None), ('conv_out', 'fsdp'),   # conv kernel (kh, kw, in, out): FSDP over `out`
            ('vocab', None), ('norm', None)]

Logical axes per leaf (our leaf names follow docs/DESIGN.md):

    kernel  (kh, kw, in, out)  -> (None, None, 'conv_in', 'conv_out')
    kernel  (in, out)          -> ('embed', 'mlp')
    embedding (V, D)           -> ('vocab', 'embed')
    scale / bias / other 1-D   -> ('norm',)            (replicated by the default rules)
    anything else              -> all None             (replicated)

A dimension whose size is not divisible by its mesh axes' total size falls back to replication
(`None`), and a mesh axis used by an earlier dimension of the same array is not reused (a
PartitionSpec may name each mesh axis once). With pure data parallelism (`fsdp` of size 1) every
parameter is replicated; with `fsdp` > 1 parameters, gradients and optimizer moments are split
(ZeRO-3 style) and XLA inserts the all-gathers / reduce-scatters.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]  # (logical name, mesh axis | tuple of mesh axes | None)

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("vocab", None),
    ("norm", None),
)


# ----------------------------------------------------------------------------- mesh


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single -1 by whatever fills `num_devices`; checks the product."""
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive (or one -1)")
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {num_devices}")
    return tuple(shape)


def make_mesh(axes: Sequence[str], shape: Sequence[int], dcn_shape: Sequence[int] = (),
              devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the device mesh.

    axes: mesh axis names, e.g. ('data', 'fsdp').
    shape: per-slice (ICI) sizes, one may be -1; with no dcn_shape it covers all devices.
    dcn_shape: optional sizes across slices / hosts (multi-slice TPU, multi-node GPU); the mesh is
      then shape * dcn_shape elementwise, built by `create_hybrid_device_mesh` so that the DCN
      (slow) links carry the outermost axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"mesh shape {tuple(shape)} does not match axes {axes}")
    if dcn_shape:
        if len(dcn_shape) != len(axes):
            raise ValueError(f"mesh dcn_shape {tuple(dcn_shape)} does not match axes {axes}")
        dcn = tuple(int(s) for s in dcn_shape)
        ici = resolve_mesh_shape(shape, len(devices) // math.prod(dcn))
        from jax.experimental import mesh_utils

        granule_is_process = devices[0].platform != "tpu"  # GPUs: one node = one granule
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=granule_is_process)
    else:
        ici = resolve_mesh_shape(shape, len(devices))
        if devices[0].platform == "tpu":
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(ici, devices)  # topology-aware order
        else:
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, axes)


def mesh_from_config(mesh_cfg) -> Mesh:
    """mesh_cfg: ConfigDict/mapping with `axes`, `shape` and optionally `dcn_shape`."""
    return make_mesh(tuple(mesh_cfg["axes"]), tuple(mesh_cfg["shape"]), tuple(mesh_cfg.get("dcn_shape", ()) or ()))


# ----------------------------------------------------------------------------- rules


def normalize_rules(rules: Rules) -> dict[str, tuple[str, ...]]:
    """[(logical, mesh axes | axis | None)] -> {logical: tuple of mesh axes}; first rule wins."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"sharding rule {entry!r}: expected (logical_name, mesh_axes)")
        name, target = entry
        if target is None:
            axes: tuple[str, ...] = ()
        elif isinstance(target, str):
            axes = (target,)
        else:
            axes = tuple(target)
        out.setdefault(str(name), axes)
    return out


LOGICAL_NAMES = frozenset(name for name, _ in DEFAULT_RULES)  # every name logical_axes() and the batch use


def check_rules(rules: Rules, mesh_axes: Sequence[str]) -> None:
    """Catches config typos up front: every rule names a logical axis the code uses (a misspelled
    one would leave its parameters silently replicated), the batch has a rule (without one every
    device would compute the whole global batch), and every mesh axis a rule names exists."""
    table = normalize_rules(rules)
    unknown_names = sorted(set(table) - LOGICAL_NAMES)
    if unknown_names:
        raise ValueError(f"sharding rules name unknown logical axes {unknown_names}; the logical axes are "
                         f"{sorted(LOGICAL_NAMES)}")
    if "batch" not in table:
        raise ValueError("sharding rules have no 'batch' rule: the batch would be replicated, every device "
                         "computing the whole global batch; add e.g. ('batch', ('data', 'fsdp'))")
    for name, axes in table.items():
        unknown = [a for a in axes if a not in mesh_axes]
        if unknown:
            raise ValueError(f"sharding rule {name!r} -> {axes}: mesh has no axis {unknown} (axes {tuple(mesh_axes)})")


def logical_axes(path: Sequence[Any], shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axis names of one parameter, from its leaf name (last path entry) and rank."""
    leaf = str(path[-1]) if path else ""
    ndim = len(shape)
    if leaf == "kernel" and ndim == 4:
        return (None, None, "conv_in", "conv_out")  # (kh, kw, in, out)
    if leaf == "kernel" and ndim == 2:
        return ("embed", "mlp")  # (in, out)
    if leaf == "embedding" and ndim == 2:
        return ("vocab", "embed")  # (V, D)
    if ndim == 1:
        return ("norm",)  # scale, bias
    return (None,) * ndim


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """PartitionSpec for an array with these logical axes; non-divisible dims are replicated."""
    table = normalize_rules(rules)
    used: set[str] = set()
    out: list[Any] = []
    for name, size in zip(logical, shape):
        axes = tuple(a for a in table.get(name, ()) if a not in used) if name is not None else ()
        axes = tuple(a for a in axes if mesh.shape[a] > 1)  # size-1 axes add nothing
        n = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if not axes or size % n:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _paths_and_leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)


def _key_name(k) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def param_logical_axes(shapes: Any) -> Any:
    """Tree of logical-axis tuples, same structure as `shapes` (arrays or ShapeDtypeStruct)."""
    flat, treedef = _paths_and_leaves(shapes)
    axes = [logical_axes([_key_name(k) for k in path], np.shape(x)) for path, x in flat]
    return jax.tree_util.tree_unflatten(treedef, axes)


def param_specs(shapes: Any, mesh: Mesh, rules: Rules) -> Any:
    """Tree of PartitionSpec, same structure as `shapes`."""
    flat, treedef = _paths_and_leaves(shapes)
    specs = [spec_for(logical_axes([_key_name(k) for k in path], np.shape(x)), np.shape(x), mesh, rules)
             for path, x in flat]
    return jax.tree_util.tree_unflatten(treedef, specs)


def param_shardings(shapes: Any, mesh: Mesh, rules: Rules) -> Any:
    """Tree of NamedSharding for a parameter tree (arrays or ShapeDtypeStruct leaves)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(shapes, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh: Mesh, rules: Rules) -> P:
    """Leading (set) axis split over the 'batch' rule's mesh axes; other dims replicated."""
    axes = tuple(a for a in normalize_rules(rules).get("batch", ()) if a in mesh.axis_names)
    if not axes:
        return P()
    return P(axes[0] if len(axes) == 1 else axes)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """One NamedSharding for every batch array (leading dim = sets)."""
    return NamedSharding(mesh, batch_spec(mesh, rules))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
    """The global batch size must be a multiple of this (devices along the batch axes)."""
    spec = batch_spec(mesh, rules)
    if not spec:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStruct tree carrying shardings (the input of AOT lowering and orbax restore)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice of the batch (leading dim = B / process_count) -> global jax.Arrays."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def put_global(tree: Any, shardings: Any) -> Any:
    """Host numpy tree, identical on every process -> global arrays with `shardings` (multi-host safe)."""
    def put(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def describe(specs: Any, limit: int = 12) -> str:
    """A short human-readable listing of specs (for the start-up log)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    lines = [".".join(str(_key_name(k)) for k in path) + f": {spec}" for path, spec in flat[:limit]]
    if len(flat) > limit:
        lines.append(f"... ({len(flat) - limit} more)")
    return "\n".join(lines)
