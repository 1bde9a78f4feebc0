"""MiniBench's protocol, shared by every evaluation of the mini world: the test cases, the paired
seeds, one generation, and the scoring of an image against its case.

A case (``make_case``) is one TEST-split subject (never seen in training) with NUM_REFERENCES
reference renders in training-like contexts and their captions, prompts in (background, placement)
pairs that training never rendered (``mw.HELDOUT_COMBOS``) with their ground-truth renders, and a
gallery of unseen renders. ``call_seed`` gives every method the same initial noise for the same
(case, prompt, seed) so rows are compared paired; ``generate`` makes one image with the first k
references; ``Scorer`` reads identity (encoder and pixels) and the prompted context back from it.

Used by ``minibench`` (the benchmark), ``guidance_sweep`` (scales on validation subjects),
``dreambooth_curve`` and ``minibench.quick_identity`` (training learning curves).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jedi_jax.data import mini_world as mw
from jedi_jax.data.pool import PLACEMENT_ONLY
from jedi_jax.eval import metrics as M

BENCH_TAG = 4242  # seed space of MiniBench's references / prompts / galleries
# MiniBench scores test subjects 0..MINIBENCH_SUBJECTS-1 by default; choices (guidance scales, a
# baseline's learning rate) belong on subjects from VALIDATION_FIRST_SUBJECT on, which it never scores.
MINIBENCH_SUBJECTS = 16
VALIDATION_FIRST_SUBJECT = 100
# The "composed prompt" row's parts: the full prompt's labels said as placement AND background. Each
# part is the start of a training caption template (pool.PLACEMENT_ONLY[0] is FULL_TEMPLATE cut after
# the placement; the other is TEMPLATES[7] cut before it), so neither part is new wording.
COMPOSED_PARTS = (PLACEMENT_ONLY[0], "a photo of a {size} {orient} {cat} {bgp}")
NUM_REFERENCES = 3
GALLERY = 3
# What the references are captioned with at sampling (generate): their own captions, or "" (the
# pipeline's default when a user gives none; captions are dropped per member in training).
REFERENCE_CAPTIONS = ("given", "empty")


# ---------------------------------------------------------------------------------- cases


def make_case(index: int, num_prompts: int) -> dict[str, Any]:
    """Test subject `index`: references (training-like contexts with distinct backgrounds, large,
    upright except the last one, as the shipped examples), prompts in held-out (background,
    placement) pairs with their ground truth, and a gallery of unseen test-context renders."""
    subject = mw.subject_for("test", index)
    rng = np.random.default_rng([BENCH_TAG, index])
    refs, masks, captions, used, places = [], [], [], [], []
    for j in range(NUM_REFERENCES):
        ctx = mw.sample_context(rng, "train", exclude_backgrounds=used)
        ctx = mw.make_context(ctx.background, ctx.placement, size="large",
                              orientation=int(j == NUM_REFERENCES - 1), seed=ctx.bg_seed)
        used.append(ctx.background)
        places.append(mw.PLACEMENTS[ctx.placement])
        image, mask = mw.render(subject, ctx)
        refs.append(image)
        masks.append(mask)
        captions.append(mw.caption(subject, ctx, rng))
    combos = [mw.HELDOUT_COMBO_IDS[i] for i in rng.permutation(len(mw.HELDOUT_COMBO_IDS))]
    prompts = []
    for j in range(num_prompts):
        b, p = combos[j % len(combos)]
        ctx = mw.make_context(b, p, size=int(rng.integers(2)), orientation=int(rng.integers(2)),
                              seed=int(rng.integers(2**31 - 1)), jitter=False)
        gt, gt_mask = mw.render(subject, ctx)
        composed = " AND ".join(mw.prompt_for(subject.category, ctx, part) for part in COMPOSED_PARTS)
        prompts.append(dict(prompt=mw.prompt_for(subject.category, ctx), composed=composed, context=ctx, gt=gt,
                            gt_mask=gt_mask))
    # The gallery has its own stream: the same subject gets the same gallery whatever num_prompts.
    gallery_rng = np.random.default_rng([BENCH_TAG, index, 1])
    gallery = [mw.render(subject, mw.sample_context(gallery_rng, "test"))[0] for _ in range(GALLERY)]
    return dict(index=index, name=subject.name, subject=subject, ref_images=np.stack(refs),
                ref_masks=np.stack(masks), ref_captions=captions, ref_placements=places,
                ref_backgrounds=[mw.BACKGROUNDS[b] for b in used], prompts=prompts,
                gallery=np.stack(gallery))


def call_seed(case_index: int, prompt_index: int, seed_index: int) -> int:
    """Pipeline seed, identical across rows (paired: same initial noise for every method)."""
    return 7919 * seed_index + 101 * case_index + prompt_index


# ---------------------------------------------------------------------------------- scoring


class Scorer:
    """Loads the shipped evaluators once; scores images against a case."""

    def __init__(self, folder: str | None = None):
        from jedi_jax.eval.context_classifier import load_context_classifier
        from jedi_jax.eval.identity_encoder import load_identity_encoder

        self.encoder = load_identity_encoder(folder)
        self.classifier = load_context_classifier(folder)
        self._cache: dict[int, dict] = {}

    def _case_state(self, case: dict) -> dict:
        if case["index"] not in self._cache:
            self._cache[case["index"]] = dict(
                refs=self.encoder.embed(case["ref_images"]), gallery=self.encoder.embed(case["gallery"]),
                pixels=M.PixelReference(case["ref_images"], case["ref_masks"]))
        return self._cache[case["index"]]

    def score(self, case: dict, prompt_index: int, images: np.ndarray) -> list[dict]:
        """images uint8 (M, H, W, 3) generated for case's prompt -> one record per image."""
        from jedi_jax.eval.cnn import to_input

        st = self._case_state(case)
        prompt = case["prompts"][prompt_index]
        images = np.asarray(images)
        if images.shape[1:3] != (mw.RES, mw.RES):
            images = ((to_input(images) + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)
        emb = self.encoder.embed(images)
        pred = self.classifier.predict(images)
        labels = prompt["context"].labels
        out = []
        for i, image in enumerate(images):
            rec = dict(enc_ref=M.cosine_to_set(emb[i], st["refs"]), enc_gallery=M.cosine_to_set(emb[i], st["gallery"]))
            rec.update(st["pixels"].score(image, prompt["gt_mask"]))
            for head in ("background", "placement", "size", "orientation"):
                rec[f"{head}_ok"] = float(pred[head][i] == labels[head])
            # both labels as prompted: every prompt names a held-out pair, so this is composition
            rec["context_ok"] = rec["background_ok"] * rec["placement_ok"]
            # the prompted pair and where the subject went, by name: placement_by_pair's inputs
            rec.update(prompt_background=mw.BACKGROUNDS[labels["background"]],
                       prompt_placement=mw.PLACEMENTS[labels["placement"]],
                       placement_pred=mw.PLACEMENTS[int(pred["placement"][i])])
            out.append(rec)
        return out


# ---------------------------------------------------------------------------------- generation


def load_pipeline(pipe_or_dir, max_references: int = NUM_REFERENCES):
    """A JeDiPipeline as given, or one loaded from a model folder (room for the protocol's references)."""
    from jedi_jax.pipeline import JeDiPipeline

    if isinstance(pipe_or_dir, JeDiPipeline):
        return pipe_or_dir
    return JeDiPipeline.from_pretrained(pipe_or_dir, max_references=max_references)


def placement_contrast_prompt(case: dict, prompt_index: int, weight: float) -> str:
    """Case's prompt as a weighted composed prompt that guides placement alone harder:
    "P(x) :1+w AND P(y) :-w/2 AND P(z) :-w/2", where P(y), P(z) are the same sentence at the other
    two placements. With text_layer="embeddings" only the placement token differs between the parts,
    so the extra term w (d_x - mean d_others) is a pure placement direction (eval.guidance_sweep)."""
    prompt = case["prompts"][prompt_index]
    ctx, category = prompt["context"], case["subject"].category
    others = [mw.prompt_for(category, dataclasses.replace(ctx, placement=q))
              for q in range(len(mw.PLACEMENTS)) if q != ctx.placement]
    return " AND ".join([f"{prompt['prompt']} :{1 + weight:g}"] + [f"{o} :{-weight / len(others):g}" for o in others])


def generate(pipe, case: dict, prompt_index: int, seed: int, k: int, *, steps: int, guidance_scale: float,
             image_guidance_scale: float, sampler: str = "ddim", eta: float = 0.0, prompt: str | None = None,
             image_guidance_interval: tuple[float, float] | None = None,
             guidance_order: str | None = None, reference_start: float = 0.0,
             reference_captions: str = "given") -> tuple[np.ndarray, dict]:
    """One image for case's prompt (or for `prompt`, another wording of it, e.g. its "composed" form)
    with the first k references; guidance_order None = the model folder's; reference_start: the part of
    the trajectory run without the references (pipeline.reference_steps); reference_captions: "given"
    (each reference's own caption) or "empty" ("", the pipeline's default when a user gives none).
    Returns (uint8 (H, W, 3), seconds)."""
    if reference_captions not in REFERENCE_CAPTIONS:
        raise ValueError(f"unknown reference_captions {reference_captions!r}; choose one of {REFERENCE_CAPTIONS}")
    if k > pipe.max_references:  # a row labelled k=3 must have used 3 references
        raise ValueError(f"k={k} references asked of a pipeline built for at most {pipe.max_references} "
                         f"(JeDiPipeline.from_pretrained(..., max_references={k}))")
    if prompt is None:
        prompt = case["prompts"][prompt_index]["prompt"]
    ref_prompts = list(case["ref_captions"][:k]) if reference_captions == "given" else [""] * k
    out = pipe([prompt], list(case["ref_images"][:k]),
               reference_prompts=ref_prompts, num_inference_steps=steps,
               guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
               image_guidance_interval=image_guidance_interval, guidance_order=guidance_order,
               reference_start=reference_start, sampler=sampler,
               eta=eta, seed=seed)
    return np.asarray(out.images[0]), out.seconds
