"""Diffusers pipeline folder <-> jedi_jax model folder (orbax params + JSON configs).

A jedi_jax model folder:

    DIR/jedi_model.json            {"format": "jedi_jax", "version": 1, "components": {name: kind}}
    DIR/<component>/config.json    the reference library's config dict (diffusers / transformers)
    DIR/<component>/params/        orbax checkpoint of the parameter tree (our naming, float32)
    DIR/tokenizer/ ...             copied as is (read by transformers.CLIPTokenizer)
    DIR/scheduler/scheduler_config.json

Both directions write into a temporary folder and rename it at the end: no half-written output.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jedi_jax.convert import components as comp
from jedi_jax.convert.param_io import atomic_directory, check_destination, restore_params, save_params
from jedi_jax.convert.torch_naming import ConversionError, params_to_torch, torch_to_params
from jedi_jax.models.clip_text import TEXT_LAYERS
from jedi_jax.models.functional import Functional
from jedi_jax.models.jedi_inputs import num_input_channels, widen_conv_in
from jedi_jax.sampling.guidance import ORDERS as GUIDANCE_ORDERS

FORMAT = {"format": "jedi_jax", "version": 1}
MODEL_FILE = "jedi_model.json"


def read_json(path: Path) -> dict:
    """A folder's JSON file as a dict; ConversionError (one line naming the file) when it is not one."""
    return comp.read_json_object(path)


def model_folder_problem(model_dir: str | Path) -> str | None:
    """Why `model_dir` is not a jedi_jax model folder, in one line naming what to do (None when it has
    jedi_model.json). Every tool that takes a model folder says this: a path that does not exist, a
    training run's --workdir (it has checkpoints/: export it), or some other folder (convert one)."""
    path = Path(model_dir)
    if (path / MODEL_FILE).exists():
        return None
    if not path.exists():
        return f"no model at {path}: the folder does not exist"
    if not path.is_dir():
        return f"no model at {path}: it is a file, not a jedi_jax model folder"
    if (path / "checkpoints").is_dir():
        return (f"{path} is a training run (it has checkpoints/), not a model folder (no {MODEL_FILE}); "
                f"export it first: python -m jedi_jax.train.export --workdir {path} --dst DIR")
    return (f"{path} is not a jedi_jax model folder (no {MODEL_FILE}); "
            "convert a diffusers folder first: python -m jedi_jax.convert --src DIFFUSERS_DIR --dst DIR")


def read_model_index(model_dir: str | Path) -> dict[str, str]:
    """{component name: kind} of a jedi_jax model folder (strict)."""
    path = Path(model_dir) / MODEL_FILE
    if not path.exists():
        raise ConversionError(model_folder_problem(model_dir) or f"no {path}")  # (or: it just vanished)
    index = read_json(path)
    if index.get("format") != FORMAT["format"] or index.get("version") != FORMAT["version"]:
        raise ConversionError(f"{path}: unsupported format {index.get('format')!r} version {index.get('version')!r}")
    components = index.get("components")
    if not isinstance(components, dict):
        raise ConversionError(f"{path}: 'components' must be an object {{folder name: kind}}, "
                              f"got {'nothing' if components is None else type(components).__name__}")
    for name, kind in components.items():
        if not name or Path(name).name != name or name.startswith("."):
            raise ConversionError(f"{path}: component name {name!r} is not a folder name")
        if not isinstance(kind, str) or kind not in comp.KIND_TO_CLASS:
            raise ConversionError(f"{path}: component {name!r} has unknown kind {kind!r} "
                                  f"(known: {sorted(comp.KIND_TO_CLASS)})")
    return dict(components)


# Sampling settings a model folder may recommend (jedi_model.json "sampling"), e.g. the guidance
# scales chosen for it on validation data; the pipeline uses them where the caller gives none.
# "text_layer" is what the UNet was trained to cross-attend to (clip_text.prompt_embeddings): a
# folder trained on another layer than "last" must say so, or sampling would read the wrong one.
SAMPLING_KEYS = ("guidance_scale", "image_guidance_scale", "text_layer", "guidance_order")


def read_sampling_defaults(model_dir: str | Path) -> dict:
    """The folder's recommended sampling settings ({} if none); strict about names and values."""
    path = Path(model_dir) / MODEL_FILE
    sampling = read_json(path).get("sampling", {}) if path.exists() else {}
    if not isinstance(sampling, dict):
        raise ConversionError(f"{path}: 'sampling' must be an object, got {type(sampling).__name__}")
    values = {k: v for k, v in sampling.items() if k != "note"}
    unknown = sorted(set(values) - set(SAMPLING_KEYS))
    if unknown:
        raise ConversionError(f"{path}: unknown sampling setting(s) {unknown}; known: {list(SAMPLING_KEYS)}")
    layer = values.pop("text_layer", None)
    order = values.pop("guidance_order", None)
    if order is not None and order not in GUIDANCE_ORDERS:
        raise ConversionError(f"{path}: sampling guidance_order must be one of {list(GUIDANCE_ORDERS)}, got {order!r}")
    if layer is not None and not (layer in TEXT_LAYERS or (isinstance(layer, int) and not isinstance(layer, bool))):
        raise ConversionError(f"{path}: sampling text_layer must be one of {list(TEXT_LAYERS)} or an int, got {layer!r}")
    bad = [k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]
    if bad:
        raise ConversionError(f"{path}: sampling setting(s) {bad} must be numbers >= 0")
    out: dict = {k: float(v) for k, v in values.items()}
    if layer is not None:
        out["text_layer"] = layer
    if order is not None:
        out["guidance_order"] = order
    return out


def write_component(folder: Path, kind: str, config, params) -> None:
    """Writes config.json and params/ of one component into `folder` (created)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(comp.config_to_dict(kind, config), indent=2, sort_keys=True))
    save_params(folder / "params", params)


def write_model_folder(dst: str | Path, parts: dict, *, extra_folders: dict[str, Path] | None = None,
                       overwrite: bool = False, source: str | None = None, sampling: dict | None = None,
                       replaced_files: dict[str, dict] | None = None) -> Path:
    """Writes a jedi_jax model folder. parts: {name: (kind, config, params)}; sampling: the
    jedi_model.json "sampling" entry (see read_sampling_defaults); replaced_files: {path inside the
    folder: JSON object} written over what extra_folders copied (a corrected scheduler config)."""
    # --overwrite replaces an earlier model folder (it has jedi_model.json), never a folder of other things
    with atomic_directory(dst, overwrite=overwrite, marker=MODEL_FILE) as tmp:
        for name, (kind, config, params) in parts.items():
            write_component(tmp / name, kind, config, params)
        for name, folder in (extra_folders or {}).items():
            shutil.copytree(folder, tmp / name)
        for rel, obj in (replaced_files or {}).items():
            (tmp / rel).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        index = dict(FORMAT, components={n: k for n, (k, _, _) in parts.items()})
        if source:
            index["source"] = source
        if sampling:
            index["sampling"] = dict(sampling)
        (tmp / MODEL_FILE).write_text(json.dumps(index, indent=2))
    return Path(dst)


def convert_diffusers_folder(src: str | Path, dst: str | Path, *, unet_in_channels: int | None = None,
                             variant: str | None = None, overwrite: bool = False, log=print) -> Path:
    """Converts a diffusers-format folder (no torch needed) into a jedi_jax model folder.

    unet_in_channels: widen the UNet's conv_in (e.g. 4 -> 9 for the JeDi inpainting layout) with
    zero-initialized new input channels, so the converted model computes what the source did; only
    the source's own width or 2 * latent_channels + 1 is accepted (check_unet_in_channels).
    A source lacking a tokenizer / scheduler its components need is refused (check_pipeline_folders).
    """
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise ConversionError(f"source {src} is not a folder (give the diffusers pipeline folder)")
    sources = comp.list_source_components(src)
    check_pipeline_folders(src, sources)
    configs = {sc.name: comp.config_from_dict(sc.kind, comp.read_config(src / sc.name),
                                              source=src / sc.name / "config.json") for sc in sources}
    check_unet_in_channels(src, sources, configs, unet_in_channels)
    check_destination(dst, overwrite=overwrite, marker=MODEL_FILE)  # before the slow part; checked again at the end
    parts = {}
    for sc in sources:
        folder, config = src / sc.name, configs[sc.name]
        tensors = comp.legacy_fixes(sc.kind, comp.read_safetensors(folder, comp.WEIGHT_FILES[sc.kind], variant),
                                    what=sc.name)
        shapes = Functional.abstract(comp.model_factory(sc.kind, config)).param_shapes()
        params = torch_to_params(tensors, shapes, what=sc.name, ignore=comp.ignored_keys(sc.kind))
        if sc.kind == "unet" and unet_in_channels is not None and unet_in_channels != config.in_channels:
            params = widen_conv_in(params, unet_in_channels)
            config = dataclasses.replace(config, in_channels=unet_in_channels)
        elif sc.kind == "unet" and config.in_channels == num_input_channels(config.out_channels):
            log(f"  note: {sc.name} already takes {config.in_channels} input channels, e.g. an SD-inpainting UNet: "
                "its mask channel marks the region to generate, JeDi's (models/jedi_inputs.py) the known "
                "members, and its last channels hold the masked image; train it as JeDi before sampling")
        parts[sc.name] = (sc.kind, config, params)
        log(f"  {sc.name}: {sc.kind}, {sum(int(np.size(t)) for t in tensors.values()) / 1e6:.1f} M parameters")
    extra = {n: src / n for n in comp.COPIED_FOLDERS if (src / n).is_dir()}
    replaced = {}
    fixed = stable_diffusion_scheduler_fixes(src)
    if fixed is not None:
        config, notes = fixed
        replaced["scheduler/scheduler_config.json"] = config
        log(f"  scheduler: outdated for Stable Diffusion, corrected as diffusers does when it loads one: "
            f"{', '.join(notes)}")
    return write_model_folder(dst, parts, extra_folders=extra, overwrite=overwrite, source=str(src),
                              replaced_files=replaced)


def tokenizer_name(text_encoder: str) -> str:
    """The tokenizer folder of a text encoder folder: text_encoder -> tokenizer, text_encoder_2 -> tokenizer_2."""
    return text_encoder.replace("text_encoder", "tokenizer") if "text_encoder" in text_encoder else "tokenizer"


def check_pipeline_folders(src: Path, sources: list) -> None:
    """ConversionError (one line naming what is missing) when the source lacks a folder that its
    converted components cannot be used without: each text encoder's tokenizer (its weights mean
    nothing with another vocabulary), the scheduler of a text-to-image UNet (sampling needs the
    noise schedule it was trained on), and any tokenizer / scheduler its model_index.json lists.
    A component subset without those (vae/ alone, unet/ alone, unet/ + vae/) needs none."""
    needed: dict[str, str] = {}
    for sc in sources:
        if sc.kind.startswith("clip_text"):
            needed.setdefault(tokenizer_name(sc.name), f"the tokenizer of {sc.name}/")
    kinds = {sc.kind for sc in sources}
    if "unet" in kinds and any(k.startswith("clip_text") for k in kinds):
        needed.setdefault("scheduler", "the noise schedule of unet/")
    index = src / "model_index.json"
    if index.exists():
        for name, value in comp.read_json_object(index).items():
            if name in comp.COPIED_FOLDERS and isinstance(value, list) and len(value) == 2 and value[1] is not None:
                needed.setdefault(name, "listed in model_index.json")
    present = {"scheduler": lambda d: (d / "scheduler_config.json").is_file()}
    missing = [f"{name}/ ({why})" for name, why in needed.items()
               if not present.get(name, Path.is_dir)(src / name)]
    if missing:
        them = "it" if len(missing) == 1 else "them"
        raise ConversionError(f"{src} lacks {' and '.join(missing)}: the converted folder would be unusable "
                              f"without {them}; copy {them} from the original diffusers pipeline folder")


def check_unet_in_channels(src: Path, sources: list, configs: dict, unet_in_channels: int | None) -> None:
    """--unet-in-channels may keep the source UNet's input channels or widen them to the JeDi layout,
    2 * latent_channels + 1 (noisy latents, known latents, mask): any other width is a folder that no
    tool can sample or train (ConversionError naming both allowed values)."""
    if unet_in_channels is None:
        return
    if isinstance(unet_in_channels, bool) or not isinstance(unet_in_channels, int) or unet_in_channels < 1:
        raise ConversionError(f"unet_in_channels (--unet-in-channels) must be a positive number of channels, "
                              f"got {unet_in_channels!r}")
    unets = [sc.name for sc in sources if sc.kind == "unet"]
    if not unets:
        raise ConversionError(f"unet_in_channels (--unet-in-channels) given, but {src} has no UNet")
    vaes = [sc.name for sc in sources if sc.kind == "vae"]
    for name in unets:
        unet = configs[name]
        # the latents the UNet denoises: the VAE's, or (no VAE in the source) what the UNet predicts
        latent = configs[vaes[0]].latent_channels if vaes else unet.out_channels
        jedi = num_input_channels(latent)
        if unet_in_channels not in (unet.in_channels, jedi):
            allowed = (f"{jedi} (2*latent_channels+1, the JeDi layout)" if unet.in_channels == jedi else
                       f"{unet.in_channels} (as is) or {jedi} (2*latent_channels+1, the JeDi layout: widened with "
                       "zero weights)")
            raise ConversionError(f"unet_in_channels (--unet-in-channels) {unet_in_channels}: {src / name} takes "
                                  f"{unet.in_channels} input channels and latent_channels={latent}; give {allowed}")


CLIPPING_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")  # whose clip_sample defaults to true


def stable_diffusion_scheduler_fixes(src: Path) -> tuple[dict, list[str]] | None:
    """(corrected scheduler config, what changed) for a Stable Diffusion 1.x / 2.x folder whose
    scheduler config is outdated; None when nothing changes.

    diffusers' StableDiffusionPipeline (and its img2img / inpaint siblings, not SDXL's) rewrites two
    outdated scheduler settings whenever it loads a folder: steps_offset != 1 becomes 1 and
    clip_sample = true becomes false (clipping latents to [-1, 1] is wrong for latent diffusion).
    A converted folder must sample what that pipeline samples from the same folder, so the converter
    makes the same corrections in the copied config, and says so.
    """
    index, config_path = src / "model_index.json", src / "scheduler" / "scheduler_config.json"
    if not (index.exists() and config_path.exists()):
        return None
    cls = str(comp.read_json_object(index).get("_class_name", ""))
    if not cls.startswith("StableDiffusion") or "XL" in cls:
        return None
    config = comp.read_json_object(config_path)
    notes = []
    # an absent key reads as the scheduler class's default: steps_offset 0 for all, clip_sample true
    # for DDIM / DDPM (diffusers fills the defaults in before it checks)
    if config.get("steps_offset", 0) != 1:
        notes.append(f"steps_offset {config.get('steps_offset', '(absent: 0)')} -> 1")
        config["steps_offset"] = 1
    if config.get("clip_sample", config.get("_class_name") in CLIPPING_SCHEDULERS) is True:
        notes.append(f"clip_sample {json.dumps(config['clip_sample']) if 'clip_sample' in config else '(absent: true)'}"
                     " -> false")
        config["clip_sample"] = False
    return (config, notes) if notes else None


def load_component_params(model_dir: str | Path, name: str, kind: str, *, shardings=None, **model_kwargs):
    """(config, Functional, params) of one component of a jedi_jax model folder.

    model_kwargs go to the model (dtype; attention_kernel/remat for the UNet); shardings, a tree
    matching the params, places them (e.g. FSDP-sharded on a mesh). A VAE whose config sets
    force_upcast (SD's) computes in float32 whatever dtype asks: diffusers' rule (half-precision
    decoding loses detail, fp16 overflows).
    """
    folder = Path(model_dir) / name
    config = comp.config_from_dict(kind, comp.read_config(folder), source=folder / "config.json")
    if kind == "vae" and "dtype" in model_kwargs and getattr(config, "force_upcast", False):
        model_kwargs["dtype"] = jnp.float32
    functional = Functional.abstract(comp.model_factory(kind, config, **model_kwargs))
    params = restore_params(folder / "params", functional.param_shapes(), what=name, shardings=shardings)
    return config, functional, params


def export_diffusers_folder(src: str | Path, dst: str | Path, *, overwrite: bool = False, log=print) -> Path:
    """Writes a jedi_jax model folder back as a diffusers-format folder (float32 safetensors)."""
    from safetensors.numpy import save_file

    src = Path(src)
    kinds = read_model_index(src)
    check_destination(dst, overwrite=overwrite, marker="model_index.json")  # before the slow part; and at the end
    model_index = diffusers_model_index(src, kinds)
    with atomic_directory(dst, overwrite=overwrite, marker="model_index.json") as tmp:
        for name, kind in kinds.items():
            config, _, params = load_component_params(src, name, kind)
            out = tmp / name
            out.mkdir()
            (out / "config.json").write_text(json.dumps(comp.config_to_dict(kind, config), indent=2, sort_keys=True))
            save_file(params_to_torch(params), str(out / f"{comp.WEIGHT_FILES[kind]}.safetensors"))
            log(f"  {name}: exported")
        for name in comp.COPIED_FOLDERS:
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name)
        (tmp / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return Path(dst)


def diffusers_model_index(src: str | Path, kinds: dict[str, str]) -> dict:
    """model_index.json for the diffusers export of the jedi_jax folder `src` with components `kinds`:
    every model, tokenizer and scheduler it holds, under the pipeline class that has these components
    (StableDiffusionXLPipeline with a second text encoder, else StableDiffusionPipeline)."""
    src = Path(src)
    sdxl = "text_encoder_2" in kinds
    index: dict = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
                   "_diffusers_version": "0.42.1"}
    for name, kind in kinds.items():
        index[name] = ["diffusers" if kind in ("unet", "vae") else "transformers", comp.KIND_TO_CLASS[kind]]
    for name in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        if (src / name).is_dir():
            config = src / name / "tokenizer_config.json"
            cls = read_json(config).get("tokenizer_class") if config.exists() else None
            index[name] = ["transformers", cls if isinstance(cls, str) and cls else "CLIPTokenizer"]
    if (src / "scheduler").is_dir():
        config = src / "scheduler" / "scheduler_config.json"
        cls = read_json(config).get("_class_name")
        if not isinstance(cls, str) or not cls:
            raise ConversionError(f"{config}: no '_class_name', which model_index.json must give for the scheduler")
        index["scheduler"] = ["diffusers", cls]
    # optional components the pipeline class has, written as diffusers writes absent ones
    optional = ("image_encoder", "feature_extractor") if sdxl else ("safety_checker", "feature_extractor",
                                                                     "image_encoder")
    for name in optional:
        index.setdefault(name, [None, None])
    if not sdxl:
        index["requires_safety_checker"] = False
    return index
