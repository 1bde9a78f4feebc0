"""The three networks of a JeDi training run, built from the config (random init) and/or from a
converted model folder (`jedi_jax.loading`), with their parameters placed on the mesh.

    bundle = build(config.model, mesh=mesh, rules=rules, seed=config.seed)
    bundle.models            Models: Functionals + static settings (closed over by the train step)
    bundle.unet_params       float32 UNet params (sharded), or None for a random init -- then
    bundle.unet_init         key -> params, traced under jit with out_shardings (born sharded)
    bundle.frozen            {'vae': params, 'text_encoder': params} (sharded, frozen)
    bundle.tokenizer         callable list[str] -> int32 (len, T)

JeDi (Sec. 4) fine-tunes the UNet of Stable Diffusion 1.5 with the 9-channel inpainting input;
the VAE and the CLIP text encoder stay frozen. A 4-channel SD UNet is widened to 2C+1 input
channels with zero weights (`widen_conv_in`), so training starts exactly at SD.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jedi_jax.models.functional import Functional
from jedi_jax.models.jedi_inputs import check_compatible, num_input_channels, widen_conv_in
from jedi_jax.train import sharding as shd
from jedi_jax.train.state import nnx_init_fn

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class Models:
    """Static description of the networks (no arrays): safe to close over in jitted functions."""

    unet: Functional
    vae: Functional
    text_encoder: Functional
    unet_config: Any  # UNetConfig
    vae_config: Any  # VAEConfig
    text_config: Any  # CLIPTextConfig
    text_layer: Any = "last"  # prompt_embeddings(layer=...)

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config.latent_channels)

    @property
    def vae_factor(self) -> int:
        return int(self.vae_config.downsample_factor)

    def encode_images(self, vae_params, images: jax.Array, key: jax.Array) -> jax.Array:
        """images (M, H, W, 3) in [-1, 1] -> diffusion latents (M, H/f, W/f, C), float32:
        a posterior sample, shifted and scaled (`scale_latents`), as diffusers' training scripts."""
        from jedi_jax.models.vae import sample_latent, scale_latents

        mean, logvar = self.vae.bind(vae_params).encode(images)
        z = sample_latent(mean.astype(jnp.float32), logvar.astype(jnp.float32), key)
        return scale_latents(z, self.vae_config)

    def encode_text(self, text_params, input_ids: jax.Array) -> jax.Array:
        """input_ids (M, T) int -> cross-attention context (M, T, D) float32."""
        from jedi_jax.models.clip_text import encode_prompts

        return encode_prompts(self.text_encoder.bind(text_params), input_ids, self.text_layer)

    def unet_apply(self, unet_params, latents, timesteps, context, member_mask) -> jax.Array:
        """(B, N, h, w, 2C+1), (B,), (B, N, T, D), (B, N) -> prediction (B, N, h, w, C) float32."""
        return self.unet.bind(unet_params)(latents, timesteps, context, member_mask)


@dataclasses.dataclass
class Bundle:
    models: Models
    unet_params: Any | None  # loaded (sharded) UNet params, or None when randomly initialized
    unet_init: Callable[[jax.Array], Any] | None  # key -> params (traceable), for random init
    frozen: dict  # {'vae': ..., 'text_encoder': ...}
    frozen_shardings: dict
    tokenizer: Callable[[list[str]], Any]
    source: str  # "random" or the folder
    # the same networks with the UNet on the "xla" attention kernel, when the run uses another: what
    # the MFU's FLOPs are counted on (step.compile_train_step); None when the run's kernel is "xla"
    flops_models: Models | None = None


def _unet_kwargs(model_cfg) -> dict:
    return dict(dtype=dtype_of(model_cfg.dtype), attention_kernel=model_cfg.attention_kernel, remat=model_cfg.remat)


def configs_from_dicts(model_cfg):
    """(UNetConfig, VAEConfig, CLIPTextConfig) of the random-init description in the config."""
    from jedi_jax.models.clip_text import CLIPTextConfig
    from jedi_jax.models.unet import UNetConfig
    from jedi_jax.models.vae import VAEConfig

    return (UNetConfig.from_diffusers(model_cfg.unet.to_dict()), VAEConfig.from_diffusers(model_cfg.vae.to_dict()),
            CLIPTextConfig.from_transformers(model_cfg.text_encoder.to_dict(), strict=True))


def _unet_factory(model_cfg, unet_config, **overrides):
    """rngs -> the UNet of `model_cfg` (dtype, kernel, remat), with `overrides` of those keywords."""
    from jedi_jax.models.unet import UNet

    kw = dict(_unet_kwargs(model_cfg), **overrides)
    return lambda r: UNet(unet_config, rngs=r, **kw)


def _factories(model_cfg, unet_config, vae_config, text_config):
    from jedi_jax.models.clip_text import CLIPTextModel
    from jedi_jax.models.vae import AutoencoderKL

    return (_unet_factory(model_cfg, unet_config),
            lambda r: AutoencoderKL(vae_config, dtype=dtype_of(model_cfg.vae_dtype), rngs=r),
            lambda r: CLIPTextModel(text_config, dtype=dtype_of(model_cfg.dtype), rngs=r))


COMPONENTS = ("unet", "vae", "text_encoder")
# The checkpoints' config JSON holds, under this key, frozen_fingerprints() of the run's frozen weights.
FROZEN_KEY = "frozen_fingerprints"


def frozen_fingerprints(frozen: dict) -> dict[str, str]:
    """{component: params_fingerprint} of the frozen VAE and text encoder. The same for the same
    weights on any mesh and process count (a checkpoint may be restored on another mesh). Where the
    arrays span several processes it gathers them (collectives): every process must call it, at the
    same point of the program, and every process gets the same digests."""
    from jedi_jax.convert.param_io import params_fingerprint

    return {name: params_fingerprint(frozen[name], to_numpy=_host_value) for name in sorted(frozen)}


def frozen_mismatch(stored: dict | None, rebuilt: dict) -> list[str]:
    """The frozen components a checkpoint's fingerprints (`stored`, None: written before they were
    recorded) name whose rebuilt fingerprint differs (resume: trainer.check_frozen; train.export)."""
    return sorted(n for n in (stored or {}) if rebuilt.get(n) != stored[n])


def _host_value(x):
    """One leaf's whole value on this host (numpy): a leaf sharded over several processes is gathered,
    replicated, one leaf at a time (host memory holds one leaf, not the whole frozen model)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


_KINDS = {"unet": "unet", "vae": "vae", "text_encoder": "clip_text"}


def build(model_cfg, *, mesh, rules, seed: int, load_unet: bool = True) -> Bundle:
    """Builds the networks of `model_cfg`.

    Each of unet / vae / text_encoder comes from the converted folder `model_cfg.pretrained` when
    the folder has it (its config.json wins over the config's dict), else it is randomly
    initialized from `model_cfg.<name>` -- e.g. the mini world: a trained VAE folder
    (jedi_jax.train.vae_trainer's vae_export/) with a random UNet and text encoder. A loaded UNet
    with fewer input channels than 2C+1 is widened with zero weights (JeDi from SD).
    load_unet=False skips reading the UNet's weights (a resumed run restores them from its checkpoint).
    """
    folder = Path(model_cfg.pretrained) if model_cfg.pretrained else None
    kinds = {}
    if folder is not None:
        from jedi_jax.convert.pipeline_folder import read_model_index

        kinds = read_model_index(folder)
        for name in COMPONENTS:
            if name in kinds and kinds[name] != _KINDS[name]:
                raise ValueError(f"{folder}: component {name!r} is a {kinds[name]!r}, expected {_KINDS[name]!r}")
    tok_dir = tokenizer_folder(model_cfg, kinds)  # before any weights load: a refusal costs nothing
    log.info("tokenizer: %s", tok_dir)
    random_cfgs = dict(zip(COMPONENTS, configs_from_dicts(model_cfg)))
    configs, loaded_from = {}, {}
    for name in COMPONENTS:
        if name in kinds:
            from jedi_jax.convert import components as comp

            configs[name] = comp.config_from_dict(kinds[name], comp.read_config(folder / name))
            loaded_from[name] = str(folder)
        else:
            configs[name] = random_cfgs[name]
            if folder is not None:
                log.warning("%s has no %r component: random init from config.model.%s", folder, name, name)
    want_in = num_input_channels(configs["vae"].latent_channels)
    unet_src = configs["unet"]
    if "unet" in loaded_from and unet_src.in_channels != want_in:
        configs["unet"] = dataclasses.replace(unet_src, in_channels=want_in)
    check_compatible(configs["unet"], configs["vae"], configs["text_encoder"])

    factories = dict(zip(COMPONENTS, _factories(model_cfg, configs["unet"], configs["vae"], configs["text_encoder"])))
    functionals = {n: Functional.abstract(f) for n, f in factories.items()}
    shardings = {n: shd.param_shardings(fm.param_shapes(), mesh, rules) for n, fm in functionals.items()}
    keys = dict(zip(COMPONENTS, jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), 3)))
    params: dict[str, Any] = {}
    for name in ("vae", "text_encoder"):
        if name in loaded_from:
            params[name] = _load(folder, name, model_cfg, shardings[name])
        else:
            params[name] = jax.jit(nnx_init_fn(factories[name]), out_shardings=shardings[name])(keys[name])
    unet_params, unet_init = None, None
    if "unet" in loaded_from and not load_unet:
        pass
    elif "unet" in loaded_from:
        _warn_text_layer_switch(folder, _text_layer(model_cfg.text_layer))
        if unet_src.in_channels == want_in:
            unet_params = _load(folder, "unet", model_cfg, shardings["unet"])
        else:  # SD text-to-image UNet: 4 -> 2C+1 input channels, new weights zero
            log.info("widening unet conv_in %d -> %d input channels (zero-init)", unet_src.in_channels, want_in)
            src_shapes = Functional.abstract(_factories(model_cfg, unet_src, configs["vae"],
                                                        configs["text_encoder"])[0]).param_shapes()
            src = _load(folder, "unet", model_cfg, shd.param_shardings(src_shapes, mesh, rules))
            unet_params = jax.jit(lambda p: widen_conv_in(p, want_in), out_shardings=shardings["unet"])(src)
    else:
        unet_init = nnx_init_fn(factories["unet"])

    models = Models(functionals["unet"], functionals["vae"], functionals["text_encoder"], configs["unet"],
                    configs["vae"], configs["text_encoder"], _text_layer(model_cfg.text_layer))
    tokenizer = _tokenizer(tok_dir, model_cfg.max_text_len, configs["text_encoder"])
    source = ", ".join(f"{n}: {loaded_from.get(n, 'random')}" for n in COMPONENTS)
    flops_models = None
    if model_cfg.attention_kernel != "xla":
        xla_unet = _unet_factory(model_cfg, configs["unet"], attention_kernel="xla")
        flops_models = dataclasses.replace(models, unet=Functional.abstract(xla_unet))
    return Bundle(models, unet_params, unet_init, {n: params[n] for n in ("vae", "text_encoder")},
                  {n: shardings[n] for n in ("vae", "text_encoder")}, tokenizer, source, flops_models)


def _load(folder: Path, name: str, model_cfg, shardings):
    """Params of one component of a converted folder (jedi_jax.loading), placed with `shardings`."""
    from jedi_jax.loading import load_component

    kw = {"dtype": dtype_of(model_cfg.vae_dtype if name == "vae" else model_cfg.dtype)}
    if name == "unet":
        kw = _unet_kwargs(model_cfg)
    return load_component(folder, name, shardings=shardings, **kw).params


def _warn_text_layer_switch(folder: Path, text_layer: str | int) -> None:
    """A warm-started UNet was trained to read one text layer (jedi_model.json sampling.text_layer,
    default "last"); a run on another layer is allowed (JeDi-mini stage 3b switched on purpose) but
    its cross-attention must relearn, so say so where the run starts."""
    from jedi_jax.convert.pipeline_folder import read_sampling_defaults

    trained = read_sampling_defaults(folder).get("text_layer", "last")
    if trained != text_layer:
        log.warning("%s's UNet was trained on text_layer=%r; this run uses %r: its cross-attention "
                    "starts from a context it never saw (set config.model.text_layer=%r to keep it)",
                    folder, trained, text_layer, trained)


def _text_layer(value):
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def tokenizer_folder(model_cfg, kinds: dict[str, str] | None = None) -> Path:
    """The CLIP tokenizer folder a run uses (the trainer and train.export both ask here):
    model.tokenizer when given, else model.pretrained's tokenizer/, else the packaged mini-world
    tokenizer -- but only when the text encoder is not loaded from model.pretrained (a random one,
    or the mini world's VAE-only folder): a loaded text encoder read through another vocabulary
    computes garbage, so a folder with text_encoder/ and no tokenizer/ is refused (ConfigError).
    kinds: read_model_index(model.pretrained), when the caller has it."""
    from jedi_jax.data.tokenizer_files import PACKAGED_DIR

    if model_cfg.tokenizer:
        return Path(model_cfg.tokenizer)
    if not model_cfg.pretrained:
        return Path(PACKAGED_DIR)
    folder = Path(model_cfg.pretrained)
    if (folder / "tokenizer").is_dir():
        return folder / "tokenizer"
    if kinds is None:
        from jedi_jax.convert.pipeline_folder import read_model_index

        kinds = read_model_index(folder)
    if "text_encoder" in kinds:
        from jedi_jax.train.trainer import ConfigError  # the trainer CLI prints it as one line

        raise ConfigError(f"model.pretrained={str(folder)!r} has a text_encoder but no tokenizer/ folder: its text "
                          "encoder needs the tokenizer it was trained with; copy that tokenizer/ into the folder "
                          "or set model.tokenizer to it")
    return Path(PACKAGED_DIR)


def _tokenizer(folder, max_len: int, text_config):
    """CLIP tokenizer from `folder` (tokenizer_folder: the packaged mini-world tokenizer for
    random-weight text encoders, every mini-world word one token)."""
    from jedi_jax.data.tokenizer_files import load_tokenizer
    from jedi_jax.models.tokenizer import CachedTokenize

    from jedi_jax.models.clip_text import check_vocabulary

    tok = load_tokenizer(str(folder))
    check_vocabulary(len(tok), text_config)
    return CachedTokenize(tok, max_len)


def count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


__all__ = ["Models", "Bundle", "build", "check_compatible", "configs_from_dicts", "dtype_of"]
