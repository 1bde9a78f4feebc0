"""Public API: load the components of a converted jedi_jax model folder.

    from jedi_jax.loading import load_model
    model = load_model("sd15-jax")                     # every component
    unet = model.unet                                   # a Component
    out = jax.jit(lambda p, *a: unet.functional.bind(p)(*a))(unet.params, latents, t, context, mask)

or one component: `load_component("sd15-jax", "vae")`. A folder is made by
`python -m jedi_jax.convert --src DIFFUSERS_DIR --dst DIR` (see README). Parameters are restored
strictly: a folder that does not match its config raises `ConversionError` naming the parameter.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jedi_jax.convert.pipeline_folder import load_component_params, read_json, read_model_index, read_sampling_defaults
from jedi_jax.convert.torch_naming import ConversionError
from jedi_jax.models.functional import Functional


@dataclasses.dataclass
class Component:
    name: str
    kind: str  # "unet" | "vae" | "clip_text" | "clip_text_projection"
    config: Any  # UNetConfig / VAEConfig / CLIPTextConfig
    functional: Functional  # .bind(params) -> NNX module, inside jit
    params: dict  # nested dict of arrays


@dataclasses.dataclass
class Model:
    folder: Path
    components: dict[str, Component]
    tokenizer: Any | None  # transformers.CLIPTokenizer
    scheduler_config: dict | None  # diffusers scheduler_config.json
    sampling: dict = dataclasses.field(default_factory=dict)  # recommended guidance scales (may be empty)
    dtype: str = "float32"  # compute dtype the components were loaded for (params stay float32)
    attention_kernel: str = "xla"

    def __getattr__(self, name: str) -> Component:
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(f"model has no component {name!r} (has {sorted(components)})")


def load_component(model_dir: str | Path, name: str, *, dtype=jnp.float32, attention_kernel: str = "xla",
                   remat: bool = False, shardings=None) -> Component:
    """Loads one component. dtype is the compute dtype (params stay float32)."""
    kinds = read_model_index(model_dir)
    if name not in kinds:
        raise ConversionError(f"{model_dir} has no component {name!r} (has {sorted(kinds)})")
    kind = kinds[name]
    kwargs: dict = {"dtype": dtype}  # (a force_upcast VAE runs in float32 whatever: load_component_params)
    if kind == "unet":
        kwargs.update(attention_kernel=attention_kernel, remat=remat)
    config, functional, params = load_component_params(model_dir, name, kind, shardings=shardings, **kwargs)
    return Component(name, kind, config, functional, params)


def load_tokenizer(model_dir: str | Path, name: str = "tokenizer"):
    from transformers import CLIPTokenizer

    folder = Path(model_dir) / name
    if not folder.is_dir():
        raise ConversionError(f"{model_dir} has no {name}/ folder")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt vocab.json reaches here as the tokenizers library's bare Exception
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"{folder}: not a loadable CLIP tokenizer: {reason}") from None


def load_model(model_dir: str | Path, *, dtype=jnp.float32, attention_kernel: str = "xla",
               remat: bool = False) -> Model:
    """Loads every component, the tokenizer and the scheduler config of a jedi_jax model folder."""
    model_dir = Path(model_dir)
    kinds = read_model_index(model_dir)
    components = {
        name: load_component(model_dir, name, dtype=dtype, attention_kernel=attention_kernel, remat=remat)
        for name in kinds
    }
    tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer").is_dir() else None
    if tokenizer is not None and "text_encoder" in components:
        from jedi_jax.models.clip_text import check_vocabulary

        try:
            check_vocabulary(len(tokenizer), components["text_encoder"].config)
        except ValueError as e:
            raise ConversionError(f"{model_dir}: {e}") from None
    sched = model_dir / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(sched) if sched.exists() else None
    return Model(model_dir, components, tokenizer, scheduler_config, read_sampling_defaults(model_dir),
                 dtype=jnp.dtype(dtype).name, attention_kernel=attention_kernel)
