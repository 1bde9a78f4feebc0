"""DreamBooth-style baseline for MiniBench: finetune the SAME model's UNet on one subject's references,
then generate text-only (Ruiz et al., CVPR 2023, without the class-prior preservation loss).

Why this baseline: JeDi's claim is finetuning-FREE personalization; the natural competitor is
test-time finetuning of the same network on the same k=3 references, timed per subject. We keep it
plain and explicit:

* each reference is its own set of ONE member with its own caption (``member_mask`` true,
  ``ref_mask`` false: nothing is known, so the 9-channel input carries no reference -- exactly
  text-to-image training), and the loss is the plain denoising MSE (epsilon or v, per the model's
  scheduler) at a uniform random t -- the repository's training loss (``train.step.latent_set_loss``,
  the core of ``jedi_loss``) for that case (``denoising_loss``);
* all k references form one batch per step (VAE posterior means and caption embeddings computed
  once); AdamW (no weight decay), global-norm clipping 1.0, constant learning rate, ``steps``
  steps; only the UNet changes (VAE, text encoder frozen);
* no rare identifier token: the mini world's captions already name the category and context, and
  the mini tokenizer has no spare word; the finetuned model is prompted with the benchmark prompt.
  No prior preservation: on a few hundred steps this may overfit towards the reference contexts --
  which is the known DreamBooth failure mode that prompt fidelity then shows.

The finetuned parameters are swapped into the pipeline (``unet_params_swapped``) so the sampler's
already-compiled program is reused (same shapes) -- no recompilation per subject.
"""
from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jedi_jax.sampling.images import load_reference, to_model_range


@contextlib.contextmanager
def unet_params_swapped(pipe, unet_params):
    """Temporarily runs `pipe` with other UNet parameters (same structure and shapes)."""
    component = pipe.model.components["unet"]
    old = component.params
    component.params = unet_params
    try:
        yield pipe
    finally:
        component.params = old


def denoising_loss(unet, schedule, prediction_type: str, params, latents, context, key):
    """The training loss (``jedi_jax.train.step.latent_set_loss``) on sets of one member with
    nothing known: latents (B, 1, h, w, C), context (B, 1, T, D)."""
    from jedi_jax.train.step import latent_set_loss

    b = latents.shape[0]
    k_t, k_noise = jax.random.split(key)
    apply = lambda p, x, t, c, m: unet.functional.bind(p)(x, t, c, m).astype(jnp.float32)  # noqa: E731
    loss, _ = latent_set_loss(apply, schedule, prediction_type, params, latents, context,
                              jnp.ones((b, 1), bool), jnp.zeros((b, 1), bool), k_t, k_noise)
    return loss


class DreamBooth:
    """Finetunes `pipe`'s UNet on (images, captions); one compiled train step reused for every subject."""

    def __init__(self, pipe, *, steps: int = 200, lr: float = 5e-5, seed: int = 0):
        from jedi_jax.models.clip_text import encode_prompts
        from jedi_jax.models.vae import scale_latents

        self.pipe, self.steps, self.lr, self.seed = pipe, int(steps), float(lr), int(seed)
        model = pipe.model
        prediction_type = pipe.schedule_config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={prediction_type!r}: use 'epsilon' or 'v_prediction'")
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(self.lr, weight_decay=0.0))
        schedule, tx, unet = pipe.schedule, self.tx, model.unet

        def train_step(params, opt_state, latents, context, key):
            loss, grads = jax.value_and_grad(
                lambda p: denoising_loss(unet, schedule, prediction_type, p, latents, context, key))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        def prepare(vae_params, text_params, images, input_ids):
            """images (k, H, W, 3) in [-1, 1], ids (k, T) -> scaled posterior-mean latents
            (k, 1, h, w, C) and caption embeddings (k, 1, T, D), computed once per subject."""
            mean, _ = model.vae.functional.bind(vae_params).encode(images)
            latents = scale_latents(mean.astype(jnp.float32), model.vae.config)
            context = encode_prompts(model.text_encoder.functional.bind(text_params), input_ids, pipe.text_layer)
            return latents[:, None], context.astype(jnp.float32)[:, None]

        self._jitted = jax.jit(train_step)
        self._prepare = jax.jit(prepare)
        self._compiled = {}
        self.compile_seconds = 0.0

    def batch(self, images, captions) -> tuple[jax.Array, jax.Array]:
        """k references -> (latents (k, 1, h, w, C), context (k, 1, T, D)): k sets of one member.
        The latents are the VAE posterior MEANS (as the sampler encodes references)."""
        size = self.pipe.resolution
        refs = np.stack([load_reference(im, size) for im in images])  # uint8 (k, size, size, 3)
        tok = self.pipe.model.tokenizer(list(captions), padding="max_length", max_length=self.pipe.max_length,
                                        truncation=True, return_tensors="np")
        model = self.pipe.model
        return self._prepare(model.vae.params, model.text_encoder.params, jnp.asarray(to_model_range(refs)),
                             jnp.asarray(tok["input_ids"].astype(np.int32)))

    def _step_fn(self, args):
        sig = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args[2:4]))
        if sig not in self._compiled:
            start = time.time()
            self._compiled[sig] = self._jitted.lower(*args).compile()
            self.compile_seconds += time.time() - start
        return self._compiled[sig]

    def finetune(self, images, captions, *, seed: int | None = None,
                 snapshot_at: tuple[int, ...] = ()) -> tuple[dict, dict]:
        """Returns (finetuned UNet params, info: seconds (wall, excluding compilation), losses).

        snapshot_at: step counts (1..steps) after which a copy of the params is kept, for an
        identity-vs-finetuning-time curve from one run: info['snapshots'] = {count: params} and
        info['seconds_at'] = {count: wall seconds so far}."""
        bad = [s for s in snapshot_at if not 1 <= s <= self.steps]
        if bad:
            raise ValueError(f"snapshot_at {bad} outside 1..{self.steps} finetuning steps")
        params = jax.tree.map(jnp.array, self.pipe.model.unet.params)  # a copy: the pipeline's stay intact
        opt_state = self.tx.init(params)
        latents, context = self.batch(images, captions)
        base = jax.random.key(self.seed if seed is None else seed)
        step = self._step_fn((params, opt_state, latents, context, base))
        start = time.time()
        losses, snapshots, seconds_at = [], {}, {}
        for i in range(self.steps):
            params, opt_state, loss = step(params, opt_state, latents, context, jax.random.fold_in(base, i))
            if i == 0 or i == self.steps - 1 or i % 50 == 0:
                losses.append((i, float(loss)))
            if i + 1 in snapshot_at:
                snapshots[i + 1] = jax.block_until_ready(params)  # immutable arrays: no copy needed
                seconds_at[i + 1] = time.time() - start
        jax.block_until_ready(params)
        info = dict(seconds=time.time() - start, steps=self.steps, lr=self.lr, losses=losses)
        if snapshot_at:
            info.update(snapshots=snapshots, seconds_at=seconds_at)
        return params, info
