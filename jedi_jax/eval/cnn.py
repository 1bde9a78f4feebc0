"""The small Flax CNN behind MiniBench's two learned evaluators, its augmentations and weight files.

Why our own evaluators: no pretrained DINO/CLIP weights reach these machines, and the mini world has
exact labels, so a small CNN trained on TRAIN-split renders is a better-calibrated judge of it than
any borrowed network would be. Both evaluators are trained only on train-split subjects and are
validated on test-split subjects (the ones MiniBench personalizes), so they never saw them.

* ``SmallCNN``: 64x64x3 in [-1, 1] -> 4 convolutions (stride 2, 2, 2, 1; GroupNorm + GELU) ->
  either a translation-invariant mean+max pool (identity encoder: where the subject stands must not
  matter) or one more stride-2 conv and a flatten (context classifier: placement IS position).
  Then an MLP to ``out_dim`` outputs. ~15 MFLOPs per image (widths 16-96), so training fits in
  a few CPU minutes.
* ``augment`` (numpy, on the host): what separates a generated image from a clean render -- blur
  (the VAE decoder), pixel noise, small brightness/contrast changes -- plus optional horizontal
  flips (JeDi training flips members, so identity must be flip-invariant; the classifier swaps
  left/right labels). No hue jitter: colour is identity.
* Weights ship as ``NAME.npz`` (float16, "/"-joined parameter paths) + ``NAME.json`` (architecture,
  training settings, validation accuracies) in ``jedi_jax/assets/minibench/``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jedi_jax.assets import ASSETS_DIR
from jedi_jax.models.functional import Functional

WEIGHTS_DIR = ASSETS_DIR / "minibench"
RES = 64


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    widths: tuple[int, ...] = (32, 64, 96, 128)
    pool: str = "mean_max"  # "mean_max" (translation invariant) | "flatten" (keeps position)
    flatten_channels: int = 64  # pool="flatten": channels of the extra 8x8 -> 4x4 conv
    hidden: int = 256
    out_dim: int = 128

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CNNConfig":
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        return cls(**d)


class SmallCNN(nnx.Module):
    def __init__(self, config: CNNConfig, *, rngs: nnx.Rngs):
        self.config = config
        w = config.widths
        ins = (3,) + tuple(w[:-1])
        kernels = [(4, 4)] + [(3, 3)] * (len(w) - 1)
        strides = [2, 2, 2] + [1] * (len(w) - 3)
        self.convs = nnx.List([nnx.Conv(i, o, k, strides=s, padding="SAME", rngs=rngs)
                               for i, o, k, s in zip(ins, w, kernels, strides)])
        self.norms = nnx.List([nnx.GroupNorm(o, num_groups=8, rngs=rngs) for o in w])
        if config.pool == "flatten":
            self.down = nnx.Conv(w[-1], config.flatten_channels, (3, 3), strides=2, padding="SAME", rngs=rngs)
            feat = config.flatten_channels * (RES // 16) ** 2
        elif config.pool == "mean_max":
            feat = 2 * w[-1]
        else:
            raise ValueError(f"pool={config.pool!r}: use 'mean_max' or 'flatten'")
        self.fc1 = nnx.Linear(feat, config.hidden, rngs=rngs)
        self.fc2 = nnx.Linear(config.hidden, config.out_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, 64, 64, 3) in [-1, 1] -> (B, out_dim)."""
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.gelu(norm(conv(x)))
        if self.config.pool == "flatten":
            x = jax.nn.gelu(self.down(x))
            x = x.reshape((x.shape[0], -1))
        else:
            x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        return self.fc2(jax.nn.gelu(self.fc1(x)))


def create(config: CNNConfig, seed: int = 0) -> tuple[Functional, dict]:
    return Functional.create(lambda rngs: SmallCNN(config, rngs=rngs), seed=seed)


# ---------------------------------------------------------------------------------- images


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 in [-1, 1] at 64x64 (resized bilinearly if needed)."""
    images = np.asarray(images)
    if images.shape[-3:-1] != (RES, RES):
        from PIL import Image

        flat = images.reshape((-1,) + images.shape[-3:])
        flat = np.stack([np.asarray(Image.fromarray(im).resize((RES, RES), Image.BILINEAR)) for im in flat])
        images = flat.reshape(images.shape[:-3] + (RES, RES, 3))
    return images.astype(np.float32) / 127.5 - 1.0


_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)  # 5-tap binomial ~ Gaussian sigma 1


def blur(x: np.ndarray) -> np.ndarray:
    """Separable 5x5 binomial blur of float (B, H, W, 3), edge-padded."""
    h, w = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (2, 2), (0, 0), (0, 0)), mode="edge")
    x = sum(c * xp[:, i:i + h] for i, c in enumerate(_BINOMIAL))
    xp = np.pad(x, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="edge")
    return sum(c * xp[:, :, i:i + w] for i, c in enumerate(_BINOMIAL))


def augment(rng: np.random.Generator, x: np.ndarray, *, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Generated-image-like degradations of float32 x (B, H, W, 3) in [-1, 1], on the host (numpy:
    jax's counter-based random numbers and depthwise convolutions are slow on XLA:CPU).
    Returns (x', flipped (B,) bool)."""
    b = x.shape[0]
    shape = (b, 1, 1, 1)
    strength = rng.uniform(0, 1.5, shape).astype(np.float32)  # 0..1.5 binomial passes (VAE softness)
    strength *= rng.random(shape) < 0.7
    b1 = blur(x)
    b2 = blur(b1)
    x = np.where(strength < 1.0, x + strength * (b1 - x), b1 + (strength - 1.0) * 2 * (b2 - b1))
    sigma = rng.uniform(0, 0.06, shape).astype(np.float32)
    x = x + sigma * rng.standard_normal(x.shape, dtype=np.float32)
    x = x * rng.uniform(0.9, 1.1, shape).astype(np.float32) + rng.uniform(-0.06, 0.06, shape).astype(np.float32)
    flipped = rng.random(b) < 0.5 if flip else np.zeros((b,), bool)
    x[flipped] = x[flipped, :, ::-1]
    return np.clip(x, -1.0, 1.0).astype(np.float32), flipped


# ---------------------------------------------------------------------------------- weights I/O


def weight_files(name: str, folder: str | Path = WEIGHTS_DIR) -> tuple[Path, Path]:
    """(NAME.npz, NAME.json) of an evaluator in `folder`: its weights and its meta (with 'config')."""
    folder = Path(folder)
    return folder / f"{name}.npz", folder / f"{name}.json"


def save(name: str, params: dict, meta: dict, folder: str | Path = WEIGHTS_DIR) -> Path:
    """Writes folder/NAME.npz (float16) and folder/NAME.json (meta must hold 'config')."""
    npz, js = weight_files(name, folder)
    npz.parent.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
    np.savez_compressed(npz, **{"/".join(map(str, k)): v.astype(np.float16) for k, v in flat.items()})
    js.write_text(json.dumps(meta, indent=1) + "\n")
    return npz


def load(name: str, folder: str | Path = WEIGHTS_DIR) -> tuple[Functional, dict, dict]:
    """(functional, float32 params, meta) of a shipped evaluator; strict about every parameter."""
    npz, js = weight_files(name, folder)
    if not npz.exists() or not js.exists():
        raise FileNotFoundError(f"no evaluator weights {npz} (+ .json); train them with "
                                f"python -m jedi_jax.eval.{name} --train")
    meta = json.loads(js.read_text())
    config = CNNConfig.from_dict(meta["config"])
    functional = Functional.abstract(lambda rngs: SmallCNN(config, rngs=rngs))
    template = traverse_util.flatten_dict(functional.param_shapes())
    with np.load(npz) as data:
        keys = set(data.files)
        flat = {}
        for k, spec in template.items():
            path = "/".join(map(str, k))
            if path not in keys or data[path].shape != spec.shape:
                raise ValueError(f"{npz}: parameter {path} missing or misshapen")
            flat[k] = jnp.asarray(data[path], jnp.float32)
            keys.discard(path)
        if keys:
            raise ValueError(f"{npz}: unexpected parameters {sorted(keys)[:5]}")
    return functional, traverse_util.unflatten_dict(flat), meta


class Evaluator:
    """A loaded CNN: `outputs(images uint8 (M, H, W, 3)) -> (M, out_dim)` in jitted batches."""

    def __init__(self, functional: Functional, params: dict, meta: dict[str, Any]):
        self.functional, self.params, self.meta = functional, params, meta
        self._apply = jax.jit(lambda p, x: functional.bind(p)(x))

    def outputs(self, images: np.ndarray, batch: int = 128) -> np.ndarray:
        x = to_input(images)
        if x.ndim == 3:
            x = x[None]
        out = []
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            pad = batch - len(chunk) if len(x) > batch else 0  # one compiled shape for big inputs
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(self._apply(self.params, chunk))[: batch - pad])
        return np.concatenate(out) if out else np.zeros((0, int(self.meta["config"]["out_dim"])), np.float32)
