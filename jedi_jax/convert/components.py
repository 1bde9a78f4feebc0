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


def config_from_dict(kind: str, d: dict):
    """Source config.json dict -> our frozen config dataclass (strict about what we implement)."""
    if kind == "unet":
        from jedi_jax.models.unet import UNetConfig

        return UNetConfig.from_diffusers(d)
    if kind == "vae":
        from jedi_jax.models.vae import VAEConfig

        return VAEConfig.from_diffusers(d)
    if kind in ("clip_text", "clip_text_projection"):
        from jedi_jax.models.clip_text import CLIPTextConfig

        return CLIPTextConfig.from_transformers(d)
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


def legacy_fixes(kind: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Brings keys to the naming our models use.

    VAE: legacy attention names, 1x1-conv attention weights squeezed. CLIP text: transformers v5
    saves `CLIPTextModel` without the `text_model.` prefix that v4 files (every SD checkpoint) have.
    """
    if kind.startswith("clip_text"):
        if any(k.startswith("text_model.") for k in tensors):
            return tensors
        return {k if k.startswith("text_projection.") else "text_model." + k: v for k, v in tensors.items()}
    if kind != "vae":
        return tensors
    out = {}
    for key, value in tensors.items():
        m = _LEGACY_VAE_RE.match(key)
        if m:
            key = m.group(1) + _LEGACY_VAE_ATTENTION[m.group(2)] + "." + m.group(3)
        if re.search(r"\.attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", key) and value.ndim == 4:
            value = value[:, :, 0, 0]  # (O, I, 1, 1) -> (O, I)
        out[key] = value
    return out


def ignored_keys(kind: str) -> tuple[str, ...]:
    if kind.startswith("clip_text"):
        return ("text_model.embeddings.position_ids",)  # a buffer, not a parameter
    return ()


@dataclasses.dataclass(frozen=True)
class SourceComponent:
    name: str  # folder name in the pipeline folder
    kind: str


def list_source_components(src: Path) -> list[SourceComponent]:
    """Components of a diffusers pipeline folder, from model_index.json or the folder names."""
    index = src / "model_index.json"
    found = []
    if index.exists():
        try:
            entries = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{index} is not valid JSON: {e}") from e
        for name, value in entries.items():
            if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
                continue
            cls = value[1]
            if cls in CLASS_TO_KIND:
                found.append(SourceComponent(name, CLASS_TO_KIND[cls]))
            elif cls is not None and name in DEFAULT_KINDS:
                raise ConversionError(f"{index}: component {name!r} has class {cls!r}, which jedi_jax does not implement")
    else:
        found = [SourceComponent(n, k) for n, k in DEFAULT_KINDS.items() if (src / n).is_dir()]
    if not found:
        raise ConversionError(f"{src} holds no convertible component (expected unet/, vae/, text_encoder/ ...)")
    return found


def read_safetensors(folder: Path, stem: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """Reads `stem[.variant].safetensors` or its sharded form (with .index.json) as numpy arrays.

    Uses safetensors' flax reader so bfloat16 files load without torch; returns float32 arrays.
    """
    from safetensors.flax import load_file

    base = f"{stem}.{variant}" if variant else stem
    single = folder / f"{base}.safetensors"
    index = folder / f"{base}.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ConversionError(f"{index} names shard files that are missing: {', '.join(missing)}")
    else:
        raise ConversionError(f"no weights in {folder}: expected {single.name} or {index.name}")
    tensors: dict[str, Any] = {}
    for f in files:
        try:
            loaded = load_file(str(f))
        except Exception as e:
            raise ConversionError(f"cannot read {f}: {type(e).__name__}: {e}") from e
        for k, v in loaded.items():
            tensors[k] = np.asarray(v, dtype=np.float32)
    return tensors


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise ConversionError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
