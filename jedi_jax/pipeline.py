"""JeDiPipeline: personalization by joint set inpainting with image guidance (JeDi, Sec. 3.4).

    from jedi_jax.pipeline import JeDiPipeline
    pipe = JeDiPipeline.from_pretrained("sd15-jedi")           # a converted folder; None = embedded default
    out = pipe(["a photo of the dog on a beach"], references=["dog0.jpg", "dog1.jpg"], seed=0)
    out.images[0].save("dog_beach.png"); out.grid.save("grid.png"); print(out.settings)
    pipe(["a photo of the dog at the left AND a photo of the dog on a beach"], ...)  # composed prompt

A prompt written as parts joined by " AND " (upper case) is a composed prompt (Composable
Diffusion, Liu et al. 2022; sampling/guidance.py): each part gets its own text-guidance branch and
the parts' guidance terms are summed, which asks for every part even where the model never saw
their combination in one caption. One extra UNet branch per extra part.

A set of static size N = num_images + max_references holds, in order, the targets, the references
and padding; the member mask tells which are real. One compiled program (per num_images, steps,
sampler) serves any number of references k <= max_references. Text encoding, reference encoding,
the whole denoising loop and decoding run inside one jax.jit.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from jedi_jax.assets import DEFAULT_MODEL_DIR
from jedi_jax.loading import Model, load_model
from jedi_jax.models.clip_text import TEXT_LAYERS, encode_prompts
from jedi_jax.models.jedi_inputs import check_compatible, num_input_channels
from jedi_jax.models.vae import scale_latents, unscale_latents
from jedi_jax.sampling import guidance
from jedi_jax.sampling.images import from_model_range, labeled_grid, load_reference, to_model_range
from jedi_jax.sampling.joint import SAMPLERS, JointSamplerConfig, sample_set
from jedi_jax.schedulers.schedule import NoiseScheduleConfig, inference_timesteps, make_schedule

DEFAULT_REFERENCE_PROMPT = ""
DEFAULT_GUIDANCE_SCALE = 3.0  # sT where neither the caller nor the model folder says
DEFAULT_IMAGE_GUIDANCE_SCALE = 2.0  # sI likewise
# A tokenizer with fewer entries than this has a closed, word-level vocabulary (JeDi-mini's: one
# token per mini-world word, 240 in all): a word it does not hold is spelled in pieces the model
# never saw in training. A real CLIP vocabulary (49,408) splits rare words legitimately: no warning.
CLOSED_VOCABULARY_SIZE = 1000
PART_SEPARATOR = re.compile(r"\s*\bAND\b\s*")  # "A AND B": a composed prompt (the upper-case word AND only)
# A composed prompt's part may end in ":w", its guidance weight (default 1; negative = "NOT"):
# "A :2 AND B :-1" guides by 2 d_A - d_B = d_A + (d_A - d_B), i.e. A, plus whatever A says that B does not.
PART_WEIGHT = re.compile(r"^(?P<text>.*?)\s*:\s*(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+))\s*$")


class PipelineInputError(ValueError):
    """Bad user input to the pipeline (one clear line, naming the problem and the limit)."""


def split_prompt(prompt: str) -> list[tuple[str, float]]:
    """A prompt -> its parts as (text, weight): one part of weight 1 for a plain prompt; for a
    composed one ("A AND B", Composable Diffusion, Liu et al. 2022), each part with its ":w" weight.
    Raises PipelineInputError for an empty part or a zero weight (0 marks padding in guidance.combine)."""
    texts = PART_SEPARATOR.split(prompt.strip())
    if len(texts) == 1:
        return [(texts[0], 1.0)]
    parts = []
    for text in texts:
        m = PART_WEIGHT.match(text)
        text, weight = (m["text"], float(m["weight"])) if m else (text, 1.0)
        if not text.strip():
            raise PipelineInputError(f"composed prompt {prompt!r} has an empty part around 'AND'")
        if weight == 0:
            raise PipelineInputError(f"composed prompt {prompt!r}: part {text!r} has weight 0 (drop the part instead)")
        parts.append((text.strip(), weight))
    return parts


def per_step_scales(scale: float, steps: int, interval: tuple[float, float] | None = None) -> np.ndarray:
    """Image guidance scale per denoising step -> float32 (steps,).

    interval (start, end): fractions of the trajectory, 0 = the first (noisiest) step, 1 = the end.
    Steps whose position i / steps lies in [start, end) get `scale`; the others get 1, where the
    references condition the model but their guidance term is not amplified (guidance in a limited
    interval, Kynkaanniemi et al., NeurIPS 2024). None: `scale` at every step. On JeDi-mini the
    references' identity forms in the later steps: (0.4, 1.0) keeps it, (0.0, 0.5) loses some
    (assets/jedi_mini/EXPERIMENTS.md, experiment 5).
    """
    scales = np.full((steps,), scale, np.float32)
    if interval is None:
        return scales
    values = tuple(interval)
    if len(values) != 2:
        raise PipelineInputError(f"image_guidance_interval={values} must be two fractions (start, end)")
    start, end = (float(v) for v in values)
    if not 0.0 <= start < end <= 1.0:
        raise PipelineInputError(f"image_guidance_interval={tuple(interval)} must satisfy 0 <= start < end <= 1")
    position = np.arange(steps) / steps  # (S,) 0 at the noisiest step
    return np.where((position >= start) & (position < end), scales, np.float32(1.0)).astype(np.float32)


def reference_steps(steps: int, start: float) -> np.ndarray | None:
    """Which denoising steps see the references -> bool (steps,), or None when all do (start 0).

    start: the fraction of the trajectory (0 = the first, noisiest step) before which the targets are
    denoised as a text-only set, references left out (sampling/joint.sample_set, `references_on`).
    On JeDi-mini this trades background for placement: the first steps set both, and the references
    carry the background while the prompt alone carries the placement
    (assets/jedi_mini/EXPERIMENTS.md, experiment 16).
    """
    start = float(start)
    if not 0.0 <= start < 1.0:
        raise PipelineInputError(f"reference_start={start} must satisfy 0 <= start < 1")
    if start == 0.0:
        return None
    return np.arange(steps) / steps >= start  # (S,)


@dataclasses.dataclass
class PipelineOutput:
    images: list  # PIL images, one per prompt, in prompt order
    references: list  # the references as the model saw them (PIL, cropped and resized)
    grid: Image.Image  # references on top, results below, prompts as labels
    set_images: np.ndarray  # uint8 (N, H, W, 3): the whole decoded set (targets, references, padding)
    settings: dict  # every resolved setting
    seconds: dict  # {"compile": ..., "run": ...}


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a seed in [0, 2**64). Without x64, jax.random.key keeps only a seed's low 32
    bits (2**32 + 1 would alias 1), so the high word is folded in; seeds below 2**32 give
    jax.random.key(seed) exactly, as they always did."""
    seed = int(seed)
    key = jax.random.key(seed & 0xFFFFFFFF)
    return key if seed < 2**32 else jax.random.fold_in(key, seed >> 32)


def _one_item(value) -> bool:
    """One path or image (a reference, or a reference mask) rather than a sequence of them: list()
    would split a path string into characters; a (k, H, W, 3) array is k of them."""
    return isinstance(value, (str, Path, Image.Image)) or (isinstance(value, np.ndarray) and value.ndim <= 3)


def _one_mask(value) -> bool:
    """One mask rather than a sequence: a path or image, an (H, W) array, or an (H, W, 1|3|4) one;
    a (k, H, W) or (k, H, W, C) array is k masks."""
    if isinstance(value, np.ndarray):
        return value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (1, 3, 4))
    return isinstance(value, (str, Path, Image.Image))


def default_model_dir() -> Path:
    """The embedded JeDi-mini shipped with the package."""
    return DEFAULT_MODEL_DIR


def check_components(model: Model, text_layer: str | int) -> None:
    """Do the folder's parts fit JeDi's set inpainting? One PipelineInputError naming the mismatch,
    where the first call would otherwise fail deep inside the UNet's trace.

    The sizes training also checks (models/jedi_inputs.check_compatible: in_channels 2C + 1, C out,
    the text encoder's width); an SDXL UNet (addition_embed_type) needs pooled text and time ids
    this pipeline does not make; the text layer must exist."""
    folder, unet, vae, text = model.folder, model.unet.config, model.vae.config, model.text_encoder.config
    try:
        check_compatible(unet, vae, text)
    except ValueError as e:
        c = vae.latent_channels
        hint = (f"; a plain SD folder: convert it with --unet-in-channels {num_input_channels(c)} and train it as JeDi"
                if unet.in_channels == c else "")
        raise PipelineInputError(f"model folder {folder}: {e}{hint}") from None
    if unet.addition_embed_type is not None:
        raise PipelineInputError(f"model folder {folder}: an SDXL-style UNet (addition_embed_type="
                                 f"{unet.addition_embed_type!r}) needs pooled text and time ids; this pipeline "
                                 f"runs SD 1.x/2.x-layout UNets")
    layers = text.num_hidden_layers
    if isinstance(text_layer, bool) or not (text_layer in TEXT_LAYERS or (
            isinstance(text_layer, int) and -(layers + 1) <= text_layer <= layers)):
        raise PipelineInputError(f"text_layer={text_layer!r} (model folder {folder}): choose one of "
                                 f"{', '.join(TEXT_LAYERS)} or a hidden-state index in [{-(layers + 1)}, {layers}]")


class JeDiPipeline:
    def __init__(self, model: Model, *, max_references: int = 3, text_layer: str | int | None = None,
                 coupled_attention: bool = True):
        """text_layer: what the cross-attention reads (clip_text.prompt_embeddings); None takes the
        model folder's (jedi_model.json "sampling"), else "last" as in SD 1.x.
        coupled_attention=False is an ablation: every member is run as its own set of one, so
        self-attention no longer crosses images and references cannot reach the targets."""
        for name in ("unet", "vae", "text_encoder"):
            if name not in model.components:
                raise PipelineInputError(f"model folder {model.folder} has no {name} component")
        if model.tokenizer is None or model.scheduler_config is None:
            raise PipelineInputError(f"model folder {model.folder} needs tokenizer/ and scheduler/ folders")
        self.model = model
        self.max_references = max_references
        # read-only (properties below): the compiled programs read them at trace time, and their
        # cache is keyed by argument shapes and sampler settings only
        self._text_layer = (getattr(model, "sampling", None) or {}).get("text_layer", "last") \
            if text_layer is None else text_layer
        self._coupled_attention = bool(coupled_attention)
        check_components(model, self._text_layer)
        try:
            self.schedule_config = NoiseScheduleConfig.from_diffusers(model.scheduler_config)
        except (ValueError, TypeError) as e:
            raise PipelineInputError(f"model folder {model.folder}: scheduler/scheduler_config.json: {e}") from None
        self._schedule = make_schedule(self.schedule_config)
        vae_cfg = model.vae.config
        self.latent_channels = vae_cfg.latent_channels
        self.resolution = vae_cfg.sample_size
        self.max_length = model.text_encoder.config.max_position_embeddings
        self._jitted = jax.jit(self._generate, static_argnames=("config", "eta", "progress"))
        self._programs: dict = {}  # (argument shapes, config, eta, progress) -> AOT-compiled program
        self._bar = None  # tqdm bar of the running call, advanced by the sampler's host callback

    @property
    def text_layer(self) -> str | int:
        return self._text_layer

    @property
    def coupled_attention(self) -> bool:
        return self._coupled_attention

    @property
    def schedule(self):
        return self._schedule

    def _on_step(self, i) -> None:
        if self._bar is not None:
            self._bar.update(1)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, *, dtype=jnp.float32,
                        attention_kernel: str = "xla", **kwargs) -> "JeDiPipeline":
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        return cls(load_model(model_dir, dtype=dtype, attention_kernel=attention_kernel), **kwargs)

    # ------------------------------------------------------------------ the compiled program
    def _generate(self, params, input_ids, empty_ids, ref_images, member_mask, ref_mask, timesteps,
                  image_scale, text_scale, key, part_ids=None, part_weights=None, references_on=None, *,
                  config: JointSamplerConfig, eta: float, progress: bool = False):
        """ref_images (B, N, H, W, 3) in [-1, 1]; input_ids (B, N, T); masks (B, N) -> images (B, N, H, W, 3).
        progress: compile in the host callback that advances the progress bar. Only then: JAX's
        persistent compilation cache refuses programs with host callbacks.
        Composed prompts: part_ids (P, B, N, T), part_weights (P, B, N); None for plain prompts.
        references_on: (S,) bool, the steps that see the references (None: all; reference_steps)."""
        unet, vae, text = self.model.unet, self.model.vae, self.model.text_encoder
        b, n, t = input_ids.shape
        text_model = text.functional.bind(params["text_encoder"])
        context = encode_prompts(text_model, input_ids.reshape(b * n, t), self.text_layer)
        context = context.reshape(b, n, t, -1)  # (B, N, T, D)
        empty = encode_prompts(text_model, empty_ids, self.text_layer)  # (1, T, D)
        context_empty = jnp.broadcast_to(empty[None], context.shape)  # (B, N, T, D)
        part_contexts = None
        if part_ids is not None:
            p_ = part_ids.shape[0]
            part_contexts = encode_prompts(text_model, part_ids.reshape(p_ * b * n, t), self.text_layer)
            part_contexts = part_contexts.reshape(p_, b, n, t, -1)  # (P, B, N, T, D)

        vae_module = vae.functional.bind(params["vae"])
        h, w = ref_images.shape[2:4]
        mean, _ = vae_module.encode(ref_images.reshape((b * n, h, w, 3)))  # (B*N, h', w', C)
        ref_latents = scale_latents(mean, vae.config).reshape((b, n) + mean.shape[1:])  # (B, N, h', w', C)

        x_T = jax.random.normal(jax.random.fold_in(key, 0), ref_latents.shape, jnp.float32)

        def unet_fn(p, x, ts, ctx, mm):
            if self.coupled_attention:
                return unet.functional.bind(p)(x, ts, ctx, mm)
            bb, nn = x.shape[:2]  # ablation: (B, N, ...) -> (B*N, 1, ...), each member its own set
            out = unet.functional.bind(p)(x.reshape((bb * nn, 1) + x.shape[2:]), jnp.repeat(ts, nn),
                                          ctx.reshape((bb * nn, 1) + ctx.shape[2:]), jnp.ones((bb * nn, 1), bool))
            return out.reshape((bb, nn) + out.shape[2:])

        layout = guidance.SetLayout(member_mask=member_mask, ref_mask=ref_mask)
        latents = sample_set(unet_fn, params["unet"], self.schedule, timesteps, x_T, ref_latents, layout,
                             context, context_empty, image_scale, text_scale, jax.random.fold_in(key, 1),
                             config=config, eta=eta, on_step=self._on_step if progress else None,
                             part_contexts=part_contexts,
                             part_weights=part_weights, references_on=references_on)
        decoded = vae_module.decode(unscale_latents(latents, vae.config).reshape((b * n,) + latents.shape[2:]))
        return decoded.reshape((b, n, h, w, 3))

    def compiled_programs(self) -> int:
        """How many programs the sampler has compiled so far (one per static shape/setting)."""
        return len(self._programs)

    def _program(self, args, config: JointSamplerConfig, eta: float, progress: bool = False):
        """The AOT-compiled program for these argument shapes; (program, compile seconds: lowering
        included, so above 0 even when JAX's persistent cache supplies the executable)."""
        signature = (tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args)), config, eta, progress)
        if signature in self._programs:
            return self._programs[signature], 0.0
        start = time.time()
        program = self._jitted.lower(*args, config=config, eta=eta, progress=progress).compile()
        self._programs[signature] = program
        return program, time.time() - start

    def _tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        tok = self.model.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                                   truncation=True, return_tensors="np")
        return tok["input_ids"].astype(np.int32)

    def _overlong(self, texts: Sequence[str]) -> list[str]:
        """The texts whose tokens (BOS and EOS included) exceed the text encoder's context: their end
        is cut off by _tokenize, so the model never reads it."""
        lengths = [len(ids) for ids in self.model.tokenizer(list(texts))["input_ids"]]
        return [t for t, n in zip(texts, lengths) if n > self.max_length]

    def _unseen_words(self, texts: Sequence[str]) -> list[str]:
        """The words of `texts` that a closed-vocabulary tokenizer (CLOSED_VOCABULARY_SIZE) does not
        read as one token, in order of appearance; [] for an open (real CLIP) vocabulary."""
        tokenizer = self.model.tokenizer
        if len(tokenizer) >= CLOSED_VOCABULARY_SIZE:
            return []
        words = dict.fromkeys(w for t in texts for w in re.findall(r"[a-z0-9']+", t.lower()))
        return [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]

    # ------------------------------------------------------------------ user API
    def guidance_scales(self, guidance_scale: float | None = None,
                        image_guidance_scale: float | None = None) -> tuple[float, float]:
        """(sT, sI): the given values, else the model folder's recommended ones (jedi_model.json
        "sampling", chosen on validation subjects for the embedded model), else 3.0 and 2.0."""
        rec = getattr(self.model, "sampling", None) or {}
        sT = rec.get("guidance_scale", DEFAULT_GUIDANCE_SCALE) if guidance_scale is None else guidance_scale
        sI = rec.get("image_guidance_scale", DEFAULT_IMAGE_GUIDANCE_SCALE) if image_guidance_scale is None \
            else image_guidance_scale
        return float(sT), float(sI)

    def guidance_order(self, order: str | None = None) -> str:
        """The given guidance order, else the model folder's ("sampling": "guidance_order"), else
        "image_first" (the paper's; sampling/guidance.py)."""
        rec = getattr(self.model, "sampling", None) or {}
        order = rec.get("guidance_order", "image_first") if order is None else order
        if order not in guidance.ORDERS:
            raise PipelineInputError(f"unknown guidance order {order!r}; choose one of {', '.join(guidance.ORDERS)}")
        return order

    def __call__(self, prompts: str | Sequence[str], references: Sequence = (), *, reference_masks=None,
                 reference_prompts: Sequence[str] | None = None, num_images: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float | None = None,
                 image_guidance_scale: float | None = None,
                 image_guidance_interval: tuple[float, float] | None = None,
                 guidance_order: str | None = None, reference_start: float = 0.0,
                 sampler: str = "ddim", eta: float = 0.0, seed: int = 0, replace_known: bool = True,
                 progress: bool = False) -> PipelineOutput:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if num_images is not None:
            if num_images < 1:
                raise PipelineInputError(f"num_images={num_images} must be >= 1")
            if len(prompts) == 1:
                prompts = prompts * num_images
            elif len(prompts) != num_images:
                raise PipelineInputError(f"got {len(prompts)} prompts for num_images={num_images}; give 1 or {num_images}")
        if not prompts:
            raise PipelineInputError("no prompt given: give at least one prompt")
        weighted_parts = [split_prompt(p) for p in prompts]  # [(text, weight), ...] per prompt
        num_parts = max(len(parts) for parts in weighted_parts)
        if num_inference_steps < 1:
            raise PipelineInputError(f"steps={num_inference_steps} must be >= 1")
        guidance_scale, image_guidance_scale = self.guidance_scales(guidance_scale, image_guidance_scale)
        if not (guidance_scale >= 0 and image_guidance_scale >= 0 and math.isfinite(guidance_scale)
                and math.isfinite(image_guidance_scale)):  # NaN fails every comparison: say so here
            raise PipelineInputError(f"guidance scales must be finite and >= 0 (got text {guidance_scale}, "
                                     f"image {image_guidance_scale})")
        image_scales = per_step_scales(image_guidance_scale, num_inference_steps, image_guidance_interval)  # (S,)
        references_on = reference_steps(num_inference_steps, reference_start)  # (S,) bool or None
        guidance_order = self.guidance_order(guidance_order)
        if guidance_order == "text_first" and num_parts > 1:
            raise PipelineInputError("guidance order 'text_first' takes one prompt per image, not composed prompts "
                                     "('A AND B'); use 'image_first'")
        if sampler not in SAMPLERS:
            raise PipelineInputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 0 <= eta <= 1 or (sampler == "dpmpp_2m" and eta != 0):  # NaN fails the range too
            raise PipelineInputError(f"eta={eta}: eta must be in [0, 1] (1 = ancestral DDPM), and 0 for dpmpp_2m "
                                     "(a deterministic solver)")
        if not 0 <= int(seed) < 2**64:
            raise PipelineInputError(f"seed={seed} must be in [0, 2**64)")
        try:
            timesteps = inference_timesteps(self.schedule_config, num_inference_steps, sampler)  # (S,)
        except ValueError as e:
            raise PipelineInputError(f"steps={num_inference_steps}: {e}") from None
        references = [references] if _one_item(references) else list(references)
        k, m = len(references), len(prompts)
        if k == 0:  # no references: every step is already text-only (and one program serves it)
            references_on = None
        if k > self.max_references:
            raise PipelineInputError(f"{k} references given but the set holds at most {self.max_references} "
                                     "(raise max_references)")
        masks = [None] * k if reference_masks is None else [reference_masks] if _one_mask(reference_masks) \
            else list(reference_masks)
        if len(masks) != k:
            raise PipelineInputError(f"{len(masks)} reference masks for {k} references")
        ref_prompts = [DEFAULT_REFERENCE_PROMPT] * k if reference_prompts is None else [reference_prompts] \
            if isinstance(reference_prompts, str) else list(reference_prompts)
        if len(ref_prompts) != k:
            raise PipelineInputError(f"{len(ref_prompts)} reference prompts for {k} references")

        size, n = self.resolution, m + self.max_references
        refs = [load_reference(r, size, mk) for r, mk in zip(references, masks)]  # uint8 (size, size, 3) each
        ref_images = np.zeros((1, n, size, size, 3), np.float32)
        for i, r in enumerate(refs):
            ref_images[0, m + i] = to_model_range(r)
        member_mask = np.zeros((1, n), bool)
        member_mask[0, : m + k] = True
        ref_mask = np.zeros((1, n), bool)
        ref_mask[0, m : m + k] = True
        # a composed prompt's targets read their parts (part_ids); their own caption is its first part
        captions = [parts[0][0] for parts in weighted_parts] + ref_prompts + [""] * (n - m - k)
        input_ids = self._tokenize(captions)[None]  # (1, N, T)
        part_ids = part_weights = None
        if num_parts > 1:
            part_weights = np.zeros((num_parts, 1, n), np.float32)  # 0: padding part / not a target
            part_texts = [[""] * n for _ in range(num_parts)]
            for i, parts in enumerate(weighted_parts):
                for j, (part, weight) in enumerate(parts):
                    part_texts[j][i], part_weights[j, 0, i] = part, weight
            part_ids = np.stack([self._tokenize(texts) for texts in part_texts])[:, None]  # (P, 1, N, T)
        cut = self._overlong([part for parts in weighted_parts for part, _ in parts] + ref_prompts)
        unseen = self._unseen_words([part for parts in weighted_parts for part, _ in parts] + ref_prompts)
        if unseen:  # before the length warning: spelling an unknown word in pieces is what makes it long
            warnings.warn(f"words outside the model's {len(self.model.tokenizer)}-token vocabulary (read as pieces "
                          f"it never saw in training): {', '.join(unseen)}", stacklevel=2)
        if cut:
            warnings.warn(f"{len(cut)} prompt(s) longer than the text encoder's {self.max_length} tokens; the end "
                          f"is not read, e.g. {cut[0]!r}", stacklevel=2)
        empty_ids = self._tokenize([""])  # (1, T)
        timesteps = jnp.asarray(timesteps, jnp.int32)
        # max_references == 0: plain joint text-to-image, 2-branch classifier-free guidance.
        config = JointSamplerConfig(sampler=sampler, prediction_type=self.schedule_config.prediction_type,
                                    replace_known=replace_known, image_guidance=self.max_references > 0,
                                    guidance_order=guidance_order if self.max_references > 0 else "image_first",
                                    clip_sample=self.schedule_config.clip_range)
        params = {name: c.params for name, c in self.model.components.items()}
        args = (params, input_ids, empty_ids, ref_images, member_mask, ref_mask, timesteps,
                jnp.asarray(image_scales), jnp.float32(guidance_scale), seed_key(seed), part_ids,
                part_weights, None if references_on is None else jnp.asarray(references_on))

        compiled, compile_s = self._program(args, config, float(eta), bool(progress))
        start = time.time()
        self._bar = tqdm(total=num_inference_steps, desc="denoising", unit="step") if progress else None
        try:
            out = np.asarray(jax.block_until_ready(compiled(*args)))
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
        run_s = time.time() - start

        images = [Image.fromarray(from_model_range(out[0, i])) for i in range(m)]
        settings = dict(prompts=prompts, reference_prompts=ref_prompts, num_references=k, num_images=m,
                        set_size=n, steps=num_inference_steps, guidance_scale=guidance_scale,
                        image_guidance_scale=image_guidance_scale, guidance_order=config.guidance_order,
                        sampler=sampler, eta=eta, seed=seed,
                        image_guidance_interval=None if image_guidance_interval is None
                        else list(image_guidance_interval), reference_start=float(reference_start),
                        replace_known=replace_known, image_guidance=config.image_guidance, resolution=size, model=str(self.model.folder),
                        prediction_type=self.schedule_config.prediction_type, text_layer=self.text_layer,
                        coupled_attention=self.coupled_attention, prompt_parts=num_parts,
                        reference_masks=[None if mk is None else str(mk) if isinstance(mk, (str, Path)) else "array"
                                         for mk in masks],
                        dtype=self.model.dtype, attention_kernel=self.model.attention_kernel,
                        truncated_prompts=cut)
        grid = labeled_grid([refs or [np.full((size, size, 3), 255, np.uint8)],
                             [from_model_range(out[0, i]) for i in range(m)]],
                            [[f"reference {i + 1}" for i in range(k)] or ["(no references)"], prompts],
                            cell=max(size, 128))
        return PipelineOutput(images, [Image.fromarray(r) for r in refs], grid, from_model_range(out[0]), settings,
                              {"compile": compile_s, "run": run_s})
