"""What each model component is: its config class, its Flax model, its files in a diffusers folder.

A diffusers-format folder (as `DiffusionPipeline.save_pretrained` writes it) holds one sub-folder
per component; `model_index.json` names the class of each. We map those classes to our kinds:

    diffusers UNet2DConditionModel        -> "unet"       (jedi_jax.models.unet.UNet)
    diffusers AutoencoderKL               -> "vae"        (jedi_jax.models.vae.AutoencoderKL)
    transformers CLIPTextModel            -> "clip_text"  (jedi_jax.models.clip_text.CLIPTextModel)
    transformers CLIPTextModelWithProjection -> "clip_text_projection"
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jedi_jax.convert.torch_naming import ConversionError

CLASS_TO_KIND = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "clip_text",
    "CLIPTextModelWithProjection": "clip_text_projection",
}
KIND_TO_CLASS = {v: k for k, v in CLASS_TO_KIND.items()}
# Folder name -> kind, when a folder has no model_index.json.
DEFAULT_KINDS = {"unet": "unet", "vae": "vae", "text_encoder": "clip_text", "text_encoder_2": "clip_text_projection"}
COPIED_FOLDERS = ("tokenizer", "tokenizer_2", "scheduler")

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "clip_text": "model",
    "clip_text_projection": "model",
}


def config_from_dict(kind: str, d: dict, source: str | Path | None = None):
    """Source config.json dict -> our frozen config dataclass (strict about what we implement).

    source: the file `d` was read from; a malformed config then raises ConversionError naming it.
    """
    where = f"{source}: " if source is not None else ""
    if not isinstance(d, dict):
        raise ConversionError(f"{where}expected a JSON object, got {type(d).__name__}")
    try:
        if kind == "unet":
            from jedi_jax.models.unet import UNetConfig

            return UNetConfig.from_diffusers(d)
        if kind == "vae":
            from jedi_jax.models.vae import VAEConfig

            return VAEConfig.from_diffusers(d)
        if kind in ("clip_text", "clip_text_projection"):
            from jedi_jax.models.clip_text import CLIPTextConfig

            return CLIPTextConfig.from_transformers(d)
    except ConversionError:
        raise
    except ValueError as e:  # an unsupported option, named by the config class
        raise ConversionError(f"{where}{e}") from e
    except (TypeError, KeyError, AttributeError, IndexError) as e:
        # a value of the wrong type (e.g. "block_out_channels": 5) fails deep inside the dataclass
        raise ConversionError(f"{where}invalid {kind} config: {type(e).__name__}: {e}") from e
    raise ConversionError(f"unknown component kind {kind!r}")


def config_to_dict(kind: str, config) -> dict:
    """Our config -> the dict the PyTorch reference class accepts (written as config.json)."""
    if kind in ("unet", "vae"):
        d = config.to_diffusers()
    else:
        d = config.to_transformers()
    d = dict(d)
    d["_class_name" if kind in ("unet", "vae") else "architectures"] = (
        KIND_TO_CLASS[kind] if kind in ("unet", "vae") else [KIND_TO_CLASS[kind]]
    )
    return d


def model_factory(kind: str, config, **kwargs) -> Callable:
    """(rngs) -> our NNX module for `config`. kwargs: dtype, and for the UNet attention_kernel/remat."""
    if kind == "unet":
        from jedi_jax.models.unet import UNet

        return lambda rngs: UNet(config, rngs=rngs, **kwargs)
    kwargs.pop("attention_kernel", None)
    kwargs.pop("remat", None)
    if kind == "vae":
        from jedi_jax.models.vae import AutoencoderKL

        return lambda rngs: AutoencoderKL(config, rngs=rngs, **kwargs)
    if kind == "clip_text":
        from jedi_jax.models.clip_text import CLIPTextModel

        return lambda rngs: CLIPTextModel(config, rngs=rngs, **kwargs)
    if kind == "clip_text_projection":
        from jedi_jax.models.clip_text import CLIPTextModelWithProjection

        return lambda rngs: CLIPTextModelWithProjection(config, rngs=rngs, **kwargs)
    raise ConversionError(f"unknown component kind {kind!r}")


# Old diffusers VAE checkpoints (SD 1.x era) name the mid-block attention differently and store its
# projections as 1x1 convs; diffusers renames them on load, so do we.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_VAE_RE = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")


def legacy_fixes(kind: str, tensors: dict[str, np.ndarray], what: str | None = None) -> dict[str, np.ndarray]:
    """Brings keys to the naming our models use.

    VAE: legacy attention names, 1x1-conv attention weights squeezed. CLIP text: transformers v5
    saves `CLIPTextModel` without the `text_model.` prefix that v4 files (every SD checkpoint) have.
    Two checkpoint tensors that end up with one name (e.g. a VAE file holding both `query.weight`
    and `to_q.weight`) raise ConversionError naming both: neither is silently dropped.
    """
    if kind.startswith("clip_text"):
        if any(k.startswith("text_model.") for k in tensors):
            return tensors
        return {k if k.startswith("text_projection.") else "text_model." + k: v for k, v in tensors.items()}
    if kind != "vae":
        return tensors
    out = {}
    origin = {}
    for key, value in tensors.items():
        source_key = key
        m = _LEGACY_VAE_RE.match(key)
        if m:
            key = m.group(1) + _LEGACY_VAE_ATTENTION[m.group(2)] + "." + m.group(3)
        if re.search(r"\.attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", key) and value.ndim == 4:
            value = value[:, :, 0, 0]  # (O, I, 1, 1) -> (O, I)
        if key in out:
            raise ConversionError(f"{what or kind}: checkpoint tensors {origin[key]!r} and {source_key!r} "
                                  f"both map to {key!r} (legacy and current attention names)")
        out[key] = value
        origin[key] = source_key
    return out


def ignored_keys(kind: str) -> tuple[str, ...]:
    if kind.startswith("clip_text"):
        return ("text_model.embeddings.position_ids",)  # a buffer, not a parameter
    return ()


@dataclasses.dataclass(frozen=True)
class SourceComponent:
    name: str  # folder name in the pipeline folder
    kind: str


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object, as a dict; ConversionError (one line naming the file) otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def list_source_components(src: Path) -> list[SourceComponent]:
    """Components of a diffusers pipeline folder, from model_index.json or the folder names."""
    index = src / "model_index.json"
    found = []
    if index.exists():
        entries = read_json_object(index)
        for name, value in entries.items():
            if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
                continue
            cls = value[1]
            if cls is not None and not isinstance(cls, str):
                raise ConversionError(f"{index}: component {name!r} has class {cls!r}, which is not a class name")
            if cls in CLASS_TO_KIND:
                found.append(SourceComponent(name, CLASS_TO_KIND[cls]))
            elif cls is not None and name in DEFAULT_KINDS:
                raise ConversionError(f"{index}: component {name!r} has class {cls!r}, which jedi_jax does not implement")
    else:
        found = [SourceComponent(n, k) for n, k in DEFAULT_KINDS.items() if (src / n).is_dir()]
    if not found:
        raise ConversionError(f"{src} holds no convertible component (expected unet/, vae/, text_encoder/ ...)")
    return found


def index_file_names(stem: str, variant: str | None) -> list[str]:
    """Names a sharded checkpoint's index may have, preferred first.

    diffusers and transformers put the variant before the last suffix (`_add_variant`):
    `diffusion_pytorch_model.safetensors.index.fp16.json`. diffusers still reads (deprecated) the
    legacy `diffusion_pytorch_model.safetensors.fp16.index.json`, so we do too.
    """
    if not variant:
        return [f"{stem}.safetensors.index.json"]
    return [f"{stem}.safetensors.index.{variant}.json", f"{stem}.safetensors.{variant}.index.json"]


def _read_weight_map(index: Path) -> dict[str, str]:
    data = read_json_object(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or not v or Path(v).name != v]
    if bad:
        raise ConversionError(f"{index}: 'weight_map' entry {bad[0]!r} does not name a shard file in {index.parent}")
    return weight_map


def _load_safetensors_file(f: Path) -> dict[str, Any]:
    from safetensors.flax import load_file

    try:
        return load_file(str(f))
    except Exception as e:
        raise ConversionError(f"cannot read {f}: {type(e).__name__}: {e}") from e


def read_safetensors(folder: Path, stem: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """Reads `stem[.variant].safetensors` or its sharded form (an index and the shards it names) as numpy arrays.

    Uses safetensors' flax reader so bfloat16 files load without torch; returns float32 arrays.
    Sharded: every tensor must be in the shard the index's weight_map names, and only there; a
    tensor the index does not list, lists elsewhere, or a second copy of one raises ConversionError.
    """
    single = folder / (f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")
    indexes = [folder / n for n in index_file_names(stem, variant)]
    if single.exists():
        return {k: np.asarray(v, dtype=np.float32) for k, v in _load_safetensors_file(single).items()}
    index = next((i for i in indexes if i.exists()), None)
    if index is None:
        raise ConversionError(f"no weights in {folder}: expected {single.name} or {indexes[0].name}")
    weight_map = _read_weight_map(index)
    files = sorted(set(weight_map.values()))
    missing = [str(folder / f) for f in files if not (folder / f).exists()]
    if missing:
        raise ConversionError(f"{index} names shard files that are missing: {', '.join(missing)}")
    tensors: dict[str, np.ndarray] = {}
    found_in: dict[str, str] = {}
    problems: list[str] = []
    for f in files:
        for k, v in _load_safetensors_file(folder / f).items():
            if k in found_in:
                problems.append(f"tensor {k!r} appears twice: in {found_in[k]} and in {f}")
                continue
            found_in[k] = f
            if k not in weight_map:
                problems.append(f"tensor {k!r} in {f} is not listed in the index")
            elif weight_map[k] != f:
                problems.append(f"tensor {k!r} is in {f}, but the index maps it to {weight_map[k]}")
            tensors[k] = np.asarray(v, dtype=np.float32)
    problems += [f"the index maps tensor {k!r} to {f}, which does not hold it"
                 for k, f in weight_map.items() if k not in found_in]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"{index}: the shards do not match the index:\n  " + "\n  ".join(shown))
    return tensors


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise ConversionError(f"missing {path}")
    return read_json_object(path)
