"""PyTorch state-dict tensors <-> our Flax parameter trees, by the naming rule of docs/DESIGN.md.

Our module attribute paths equal the PyTorch reference's state-dict keys, so conversion is generic:

    torch `a.b.0.conv1.weight` (O, I, kh, kw)  <->  params['a']['b'][0]['conv1']['kernel'] (kh, kw, I, O)
    torch `a.proj.weight`      (O, I)          <->  params['a']['proj']['kernel'] (I, O)
    torch `a.norm.weight`                      <->  params['a']['norm']['scale']
    torch `a.token_embedding.weight`           <->  params['a']['token_embedding']['embedding']
    torch `a.x.bias`                           <->  params['a']['x']['bias']

Both directions are strict: a missing, unexpected or mis-shaped tensor raises `ConversionError`
naming it (and every other problem found, so one run shows the whole picture).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np

# flax leaf name -> torch leaf name
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class ConversionError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    """Nested dict -> {path tuple: leaf}. Integer keys (nnx.List indices) stay ints."""
    out = {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[tuple, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def torch_key(path: tuple, raw: Iterable[str] = ()) -> str:
    """Flax param path -> PyTorch state-dict key. Leaves named in `raw` are bare torch nn.Parameters
    (ViT's cls_token): their key is the path itself, their layout torch's."""
    leaf = path[-1]
    if leaf in raw:
        return ".".join(str(p) for p in path)
    if leaf not in _LEAF_TO_TORCH:
        raise ConversionError(f"parameter {'.'.join(map(str, path))}: leaf name {leaf!r} has no PyTorch equivalent")
    return ".".join(str(p) for p in path[:-1]) + "." + _LEAF_TO_TORCH[leaf]


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:  # Linear (O, I) -> (I, O)
        return array.T
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:  # (kh, kw, I, O) -> (O, I, kh, kw)
        return np.transpose(array, (3, 2, 0, 1))
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def torch_to_params(
    tensors: Mapping[str, np.ndarray],
    shapes: Mapping,
    *,
    what: str,
    rename: Callable[[str], str] | None = None,
    ignore: Iterable[str] = (),
    raw: Iterable[str] = (),
) -> dict:
    """Builds our params from PyTorch tensors (numpy arrays, any float dtype) for the model `what`.

    Args:
      tensors: state-dict key -> array (e.g. read from a diffusers safetensors file).
      shapes: nested dict of ShapeDtypeStruct (`Functional.param_shapes()`), the target structure.
      what: the component's name, used in error messages ("unet", "vae", "text_encoder").
      rename: maps a checkpoint key to the current naming (legacy checkpoints), applied first.
      ignore: checkpoint keys known to carry no parameters we model (e.g. buffers); exact match
        or prefix ending in '.'.
      raw: leaf names of bare nn.Parameters, kept under their own name and layout (torch_key).
    Returns:
      nested dict of float32 numpy arrays with the structure of `shapes`.
    """
    ignore, raw = tuple(ignore), tuple(raw)
    renamed: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        new = rename(key) if rename else key
        if new in renamed:
            raise ConversionError(f"{what}: two checkpoint tensors map to {new!r}")
        renamed[new] = value

    problems: list[str] = []
    used: set[str] = set()
    flat_out: dict[tuple, np.ndarray] = {}
    for path, spec in flatten(shapes).items():
        key = torch_key(path, raw)
        if key not in renamed:
            problems.append(f"missing tensor {key!r} (expected shape {tuple(spec.shape)})")
            continue
        used.add(key)
        array = _to_flax_layout(path[-1], np.asarray(renamed[key]))
        if tuple(array.shape) != tuple(spec.shape):
            problems.append(
                f"tensor {key!r} has shape {tuple(np.asarray(renamed[key]).shape)}, "
                f"which gives {tuple(array.shape)} but the model needs {tuple(spec.shape)}"
            )
            continue
        flat_out[path] = array.astype(np.float32)

    def ignored(k: str) -> bool:
        return any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignore)

    unexpected = sorted(k for k in renamed if k not in used and not ignored(k))
    problems += [f"unexpected tensor {k!r} (shape {tuple(np.asarray(renamed[k]).shape)})" for k in unexpected]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"{what}: checkpoint does not match the model:\n  " + "\n  ".join(shown))
    return unflatten(flat_out)


def params_to_torch(params: Mapping, dtype=np.float32) -> dict[str, np.ndarray]:
    """Our params -> PyTorch state-dict naming and layout (contiguous numpy arrays)."""
    out = {}
    for path, value in flatten(params).items():
        out[torch_key(path)] = np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(value, dtype=dtype)))
    return out
