"""Image and text embedders of the DreamBench metrics, loaded strictly from Hugging Face model folders.

DreamBench (Ruiz et al., DreamBooth, CVPR 2023, Sec. 4.1) scores subject fidelity by DINO (the mean
pairwise cosine similarity of ViT-S/16 DINO CLS embeddings of generated and real images) and CLIP-I
(the same with CLIP image embeddings), prompt fidelity by CLIP-T (the cosine of the CLIP embeddings of a
generated image and its prompt). JeDi (Zeng et al., CVPR 2024) reports the three.

    dino = DinoScorer.from_folder("weights/dino-vits16")            # facebook/dino-vits16 as downloaded
    clip = ClipScorer.from_folder("weights/clip-vit-large-patch14")  # openai/clip-vit-large-patch14
    a, b = dino.image_embeds(generated), dino.image_embeds(real)     # uint8 (n, H, W, 3) -> (n, D), unit norm
    dino_score = (a @ b.T).mean()

A folder holds config.json and model.safetensors (or its sharded form with model.safetensors.index.json),
preprocessor_config.json (optional), and for CLIP the tokenizer files (vocab.json, merges.txt). Loading is
strict: every tensor of the file is used or in the ignore list of its scorer (buffers, CLIP's logit_scale,
ViT's unused pooler), every parameter filled at its shape; otherwise one `ConversionError` naming the key.

Preprocessing mirrors transformers' PIL image processors (`CLIPImageProcessorPil`, `ViTImageProcessorPil`)
as the folder's preprocessor_config.json sets them: PIL resize, center crop, rescale, normalize. The
models (models.vit, models.clip_text) run float32 in jitted batches, by default on the host CPU (leaving
accelerator memory to the generator; `device=` picks another, still at float32 matmul precision). On 2 CPU
cores CLIP ViT-L/14 takes ~0.9 s an image, DINO ViT-S/16 ~0.05 s.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jedi_jax.convert import components as comp
from jedi_jax.convert.torch_naming import ConversionError, torch_to_params
from jedi_jax.models.functional import Functional
from jedi_jax.models.tokenizer import tokenize
from jedi_jax.models.vit import (CLIP_DEFAULTS, RAW_PARAMETERS, VIT_DEFAULTS, CLIPVisionModelWithProjection, ViTConfig,
                                 ViTModel)

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# transformers' image processor defaults (image_utils, CLIPImageProcessorPil, ViTImageProcessorPil);
# "size"/"crop_size" None = the model's image_size.
CLIP_PROCESSOR = dict(do_resize=True, size=None, resample=3, do_center_crop=True, crop_size=None, do_rescale=True,
                      rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
VIT_PROCESSOR = dict(CLIP_PROCESSOR, resample=2, do_center_crop=False, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
# Checkpoint tensors that carry nothing the scorers use.
CLIP_VISION_IGNORED = ("text_model.", "text_projection.weight", "logit_scale", "vision_model.embeddings.position_ids")
CLIP_TEXT_IGNORED = ("vision_model.", "visual_projection.weight", "logit_scale") + comp.ignored_keys("clip_text")
DINO_IGNORED = ("pooler.dense.weight", "pooler.dense.bias")  # ViTModel's pooler: DreamBench takes the CLS token


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """A transformers PIL image processor's steps for uint8 RGB images: resize (to shortest_edge, keeping the
    aspect ratio, or to size (h, w)), center crop to crop (h, w), x * rescale, (x - mean) / std."""

    shortest_edge: int | None
    size: tuple[int, int] | None
    resample: int  # PIL.Image.Resampling: 2 bilinear, 3 bicubic
    crop: tuple[int, int] | None
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_config(cls, d: dict, defaults: dict, *, image_size: int, default_to_square: bool,
                    source: Path | str = "preprocessor_config.json") -> "ImagePreprocess":
        """From a preprocessor_config.json dict over the processor class's `defaults`. An int size means
        (n, n) if `default_to_square` (ViT) else the shortest edge (CLIP), as in transformers' get_size_dict.
        The images it gives must have the model's image_size (no position-embedding interpolation)."""
        c = {**defaults, **{k: d[k] for k in defaults if k in d}}
        if d.get("do_pad") or not c["do_resize"]:
            raise ConversionError(f"{source}: only processors that resize (do_resize true, no do_pad) are supported")

        def hw(v, square: bool):  # -> (shortest_edge, (h, w))
            v = image_size if v is None else v
            if isinstance(v, int):
                return (None, (v, v)) if square else (v, None)
            if isinstance(v, dict) and set(v) == {"shortest_edge"}:
                return int(v["shortest_edge"]), None
            if isinstance(v, dict) and set(v) == {"height", "width"}:
                return None, (int(v["height"]), int(v["width"]))
            raise ValueError(f"unsupported size {v!r} (an int, {{'shortest_edge': n}} or {{'height': h, 'width': w}})")

        try:
            edge, size = hw(c["size"], default_to_square)
            crop = hw(c["crop_size"], True)[1] if c["do_center_crop"] else None
            three = lambda v: tuple(map(float, v)) if isinstance(v, (list, tuple)) else (float(v),) * 3  # noqa: E731
            norm = (three(c["image_mean"]), three(c["image_std"])) if c["do_normalize"] else (None, None)
            rescale = float(c["rescale_factor"]) if c["do_rescale"] else None
            out = cls(edge, size, int(c["resample"]), crop, rescale, *norm)
        except (TypeError, ValueError) as e:
            raise ConversionError(f"{source}: {e}") from None
        least = (edge, edge) if edge is not None else size  # the smallest image the resize gives
        if crop is not None and (crop[0] > least[0] or crop[1] > least[1]):
            raise ConversionError(f"{source}: the center crop {crop} is larger than the resized image")
        if (crop or size) != (image_size, image_size):
            raise ConversionError(f"{source}: the preprocessing gives {crop or size or 'variable-size'} images but "
                                  f"the model takes {image_size}x{image_size} (position-embedding interpolation is "
                                  "not implemented)")
        return out

    @classmethod
    def from_folder(cls, folder: Path, defaults: dict, **kwargs) -> "ImagePreprocess":
        path = folder / "preprocessor_config.json"
        d = comp.read_json_object(path) if path.exists() else {}
        return cls.from_config(d, defaults, source=path, **kwargs)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (h, w, 3), the arithmetic of transformers' numpy transforms."""
        h, w = image.shape[:2]
        new = self.size
        if self.shortest_edge is not None:  # image_transforms.get_resize_output_image_size(default_to_square=False)
            short, long = min(h, w), max(h, w)
            long = int(self.shortest_edge * long / short)
            new = (long, self.shortest_edge) if w <= h else (self.shortest_edge, long)
        x = np.asarray(Image.fromarray(image).resize((new[1], new[0]), resample=self.resample))  # (h', w', 3)
        if self.crop is not None:  # image_transforms.center_crop (never smaller than the crop: from_config)
            (ch, cw), (h, w) = self.crop, x.shape[:2]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[top:top + ch, left:left + cw]
        if self.rescale is not None:  # image_transforms.rescale: in float64, then float32
            x = (x.astype(np.float64) * self.rescale).astype(np.float32)
        x = x.astype(np.float32, copy=False)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x


def _folder(folder) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder (expected a Hugging Face model folder with config.json)")
    return folder


def _config(folder: Path, model_type: str, what: str) -> dict:
    config = comp.read_config(folder)  # ConversionError "missing .../config.json"
    if config.get("model_type") != model_type:
        raise ConversionError(f"{folder / 'config.json'}: model_type is {config.get('model_type')!r}, expected "
                              f"{model_type!r} ({what})")
    return config


def _vision_config(d: dict, defaults: dict, source: Path) -> ViTConfig:
    try:
        return ViTConfig.from_transformers(d, defaults)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source}: {e}") from None


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    try:
        return comp.read_safetensors(folder, "model")
    except ConversionError as e:
        if (folder / "pytorch_model.bin").exists():
            raise ConversionError(f"{e} (the folder has only pytorch_model.bin: re-save it with transformers' "
                                  "save_pretrained, which writes model.safetensors)") from None
        raise


def checkpoint_params(tensors: dict[str, np.ndarray], functional: Functional, *, what: str,
                      ignore: Sequence[str] = ()) -> dict:
    """`torch_to_params` with the bare torch nn.Parameters of models.vit (RAW_PARAMETERS), its list
    of problems on one line."""
    try:
        return torch_to_params(tensors, functional.param_shapes(), what=what, ignore=ignore, raw=RAW_PARAMETERS)
    except ConversionError as e:  # its list of problems, one a line -> one line
        raise ConversionError(str(e).replace(":\n  ", ": ", 1).replace("\n  ", "; ")) from None


def _unit(x: jax.Array) -> jax.Array:  # (B, D) -> (B, D), L2-normalized in float32
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _embed_fn(functional: Functional, head: Callable) -> Callable:
    """jit((params, inputs) -> unit-norm embeddings (B, D)) of head(module, inputs); params are an argument."""
    def f(params, inputs):
        with jax.default_matmul_precision("highest"):
            return _unit(head(functional.bind(params), inputs))

    return jax.jit(f)


def embed_each(scorer, images: Sequence[np.ndarray]) -> np.ndarray:
    """(M, D) unit rows: each uint8 (H, W, 3) image (sizes may differ, as photos do) through the
    scorer's own preprocessing as it is, as transformers' processor would take it."""
    if not len(images):
        return np.zeros((0, scorer.dim), np.float32)
    return np.concatenate([scorer.image_embeds(np.asarray(image)[None]) for image in images])


def mean_pairwise_cosine(embeds: np.ndarray) -> float | None:
    """Mean cosine over the ordered pairs of distinct rows of unit embeddings (M, D): DreamBench's
    real-photo ceiling, and how alike a set's images are (None below 2 rows)."""
    m = len(embeds)
    if m < 2:
        return None
    gram = embeds @ embeds.T  # (M, M)
    return float((gram.sum() - np.trace(gram)) / (m * (m - 1)))


class _Embedder:
    """Batching shared by the scorers: rows of at most `batch_size`, each padded up to a power of two (a few
    compiled shapes), on `device` (None: the host CPU; on an accelerator matmuls still run at float32
    precision, "highest")."""

    batch_size: int
    dim: int  # embedding size
    preprocess: ImagePreprocess

    def _batched(self, fn: Callable, params: dict, n: int, rows: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """fn(params, rows(i, j)) over [0, n) in rows of at most batch_size -> float32 (n, dim)."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, n, self.batch_size):
            x = rows(i, min(n, i + self.batch_size))  # (b, ...)
            padded = np.zeros((1 << (len(x) - 1).bit_length(),) + x.shape[1:], x.dtype)  # (2^k >= b, ...)
            padded[:len(x)] = x
            out.append(np.asarray(fn(params, jax.device_put(padded, self.device)))[:len(x)])
        return np.concatenate(out)

    def _images(self, fn: Callable, params: dict, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (n, H, W, 3), got {images.dtype} {images.shape}")
        pixels = lambda i, j: np.stack([self.preprocess(im) for im in images[i:j]])  # noqa: E731  (b, S, S, 3)
        return self._batched(fn, params, len(images), pixels)

    def _place(self, device) -> None:
        self.device = jax.devices("cpu")[0] if device is None else device


class ClipScorer(_Embedder):
    """CLIP-I and CLIP-T: image and prompt embeddings of a transformers `CLIPModel` folder, L2-normalized
    (`CLIPModel.get_image_features` / `get_text_features` followed by CLIPModel.forward's normalization)."""

    def __init__(self, vision: Functional, vision_params: dict, text: Functional, text_params: dict, tokenizer,
                 preprocess: ImagePreprocess, *, batch_size: int = 16, device=None):
        self._place(device)
        self.preprocess, self.tokenizer, self.batch_size = preprocess, tokenizer, int(batch_size)
        self.max_length = text.param_shapes()["text_model"]["embeddings"]["position_embedding"]["embedding"].shape[0]
        self.dim = vision.param_shapes()["visual_projection"]["kernel"].shape[1]
        self.vision, self.text = vision, text
        self.vision_params, self.text_params = jax.device_put((vision_params, text_params), self.device)
        self._image_fn = _embed_fn(vision, lambda m, x: m(x))
        self._text_fn = _embed_fn(text, lambda m, ids: m(ids).text_embeds)

    @classmethod
    def from_folder(cls, folder, *, batch_size: int = 16, device=None) -> "ClipScorer":
        """A `CLIPModel` folder (openai/clip-vit-large-patch14 layout: text_model.*, vision_model.*,
        visual_projection, text_projection, logit_scale) with its tokenizer files."""
        from jedi_jax.loading import load_tokenizer
        from jedi_jax.models.clip_text import CLIPTextModelWithProjection, check_vocabulary

        folder = _folder(folder)
        config = _config(folder, "clip", "a transformers CLIPModel folder such as openai/clip-vit-large-patch14")
        source = folder / "config.json"
        if not (isinstance(config.get("text_config"), dict) and isinstance(config.get("vision_config"), dict)):
            raise ConversionError(f"{source}: a CLIPModel config needs text_config and vision_config objects")
        projection = config.get("projection_dim") or 512  # CLIPModel's, not the sub-configs' own
        vision_cfg = _vision_config(dict(config["vision_config"], projection_dim=projection), CLIP_DEFAULTS, source)
        text_cfg = dataclasses.replace(comp.config_from_dict("clip_text_projection", config, source),
                                       projection_dim=projection)
        tensors = _tensors(folder)
        vision = Functional.abstract(lambda r: CLIPVisionModelWithProjection(vision_cfg, rngs=r))
        text = Functional.abstract(lambda r: CLIPTextModelWithProjection(text_cfg, rngs=r))
        vision_params = checkpoint_params(tensors, vision, what=f"{folder} (CLIP vision)",
                                          ignore=CLIP_VISION_IGNORED)
        text_params = checkpoint_params(tensors, text, what=f"{folder} (CLIP text)", ignore=CLIP_TEXT_IGNORED)
        tokenizer = load_tokenizer(folder.resolve().parent, folder.resolve().name)
        try:
            check_vocabulary(len(tokenizer), text_cfg)
        except ValueError as e:
            raise ConversionError(f"{folder}: {e}") from None
        preprocess = ImagePreprocess.from_folder(folder, CLIP_PROCESSOR, image_size=vision_cfg.image_size,
                                                 default_to_square=False)
        return cls(vision, vision_params, text, text_params, tokenizer, preprocess, batch_size=batch_size,
                   device=device)

    def image_embeds(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3), any H, W -> float32 (n, D), L2-normalized image embeddings."""
        return self._images(self._image_fn, self.vision_params, images)

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """n prompts -> float32 (n, D), L2-normalized; tokenized to max_position_embeddings (77), truncated."""
        if isinstance(prompts, str):
            raise ValueError("text_embeds takes a list of prompts, not one string")
        prompts = list(prompts)
        ids = tokenize(self.tokenizer, prompts, self.max_length) if prompts else np.zeros((0, self.max_length), int)
        return self._batched(self._text_fn, self.text_params, len(ids), lambda i, j: ids[i:j])


class DinoScorer(_Embedder):
    """DINO: L2-normalized CLS token of the last hidden state (after the final layernorm) of a transformers
    `ViTModel` folder (facebook/dino-vits16, DreamBench's; dino-vitb16 loads the same way)."""

    def __init__(self, functional: Functional, params: dict, preprocess: ImagePreprocess, *, batch_size: int = 16,
                 device=None):
        self._place(device)
        self.preprocess, self.batch_size = preprocess, int(batch_size)
        self.dim = functional.param_shapes()["layernorm"]["scale"].shape[0]
        self.functional, self.params = functional, jax.device_put(params, self.device)
        self._image_fn = _embed_fn(functional, lambda m, x: m(x)[:, 0])

    @classmethod
    def from_folder(cls, folder, *, batch_size: int = 16, device=None) -> "DinoScorer":
        """A `ViTModel` folder (facebook/dino-vits16 layout: embeddings.*, encoder.layer.*, layernorm, and
        pooler.dense, which is ignored)."""
        folder = _folder(folder)
        config = _config(folder, "vit", "a transformers ViTModel folder such as facebook/dino-vits16")
        cfg = _vision_config(dict(config, projection_dim=None), VIT_DEFAULTS, folder / "config.json")
        functional = Functional.abstract(lambda r: ViTModel(cfg, rngs=r))
        params = checkpoint_params(_tensors(folder), functional, what=f"{folder} (DINO ViT)", ignore=DINO_IGNORED)
        preprocess = ImagePreprocess.from_folder(folder, VIT_PROCESSOR, image_size=cfg.image_size,
                                                 default_to_square=True)
        return cls(functional, params, preprocess, batch_size=batch_size, device=device)

    def image_embeds(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3), any H, W -> float32 (n, D), L2-normalized CLS embeddings."""
        return self._images(self._image_fn, self.params, images)


__all__ = ["ClipScorer", "DinoScorer", "ImagePreprocess", "checkpoint_params"]
