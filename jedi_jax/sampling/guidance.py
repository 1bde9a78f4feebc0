"""Image + text guidance for joint set sampling (JeDi, Sec. 3.4 "image guidance").

Three branches, all batched into ONE UNet call per step (stacked on the set-batch axis):

    noI_noT: references removed (member mask off), targets with empty prompts
    I_noT:   references present,                   targets with empty prompts
    I_T:     references present,                   targets with their prompts

    out = e(noI,noT) + sI * (e(I,noT) - e(noI,noT)) + sT * (e(I,T) - e(I,noT))

With sI = sT = 1 this is exactly e(I,T); with sI = sT = 0 it is e(noI,noT), which sees neither the
references nor the prompts. The combination is linear, so it applies to epsilon and v outputs alike.
The branch structure is passed explicitly (masks and contexts), never inferred from batch sizes.

Without references (plain joint text-to-image), e(I, .) = e(noI, .) and only two branches are
needed: classifier-free guidance  out = e(noT) + sT * (e(T) - e(noT))  (`image_guidance=False`).

Composed prompts (Composable Diffusion, Liu et al., ECCV 2022: "A AND B"): a target's prompt given
as P parts, each part its own text branch I_T_j, the text terms summed with per-member weights w_j
(the part's weight, 1 unless the prompt says "part :w", negative to steer away; 0 for padding of a
member with fewer parts):

    out = e(noI,noT) + sI * (e(I,noT) - e(noI,noT)) + sT * sum_j w_j (e(I,T_j) - e(I,noT))

so the model is asked for every part at full strength (a product of the parts' conditionals), not
for the one sentence, whose combination of words it may never have seen. With P = 1 and w = 1 this
is the formula above. Branches then number 2 + P (1 + P without image guidance).

The order of the two guidance terms (`order`). The formula above ("image_first", InstructPix2Pix's
and the paper's) measures the references' effect WITHOUT the targets' prompts: the image term pulls
a target toward what the references alone suggest, their layout and background included. The
alternative ("text_first") measures it WITH the prompts, so the image term carries what the
references add to the prompted image:

    noI_noT, noI_T (references removed, targets with their prompts), I_T
    out = e(noI,noT) + sT * (e(noI,T) - e(noI,noT)) + sI * (e(I,T) - e(noI,T))

It is still exactly e(I,T) at sI = sT = 1 and needs the same 3 branches (one prompt part only).
The two orders differ by (sI - sT) (e(I,T) - e(noI,T) - e(I,noT) + e(noI,noT)), the interaction of
references and prompt, so they agree at sI = sT. On JeDi-mini text_first lowers placement for the
same identity (assets/jedi_mini/EXPERIMENTS.md, experiment 11); image_first stays the default.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import struct

BRANCHES = ("noI_noT", "I_noT", "I_T")
TEXT_FIRST_BRANCHES = ("noI_noT", "noI_T", "I_T")
TEXT_BRANCHES = ("noT", "T")
ORDERS = ("image_first", "text_first")


def check_order(order: str, num_parts: int = 1) -> None:
    """Raises ValueError for an unknown order, or for text_first with composed prompts (P > 1)."""
    if order not in ORDERS:
        raise ValueError(f"unknown guidance order {order!r}; choose one of {ORDERS}")
    if order == "text_first" and num_parts != 1:
        raise ValueError("guidance order 'text_first' takes one prompt per target, not composed prompts")


def num_branches(image_guidance: bool, num_parts: int = 1) -> int:
    """UNet branches per step: the no-text ones, plus one text branch per prompt part."""
    return (len(BRANCHES) if image_guidance else len(TEXT_BRANCHES)) + num_parts - 1


@struct.dataclass
class SetLayout:
    """Which members of each set are what; all (B, N) bool.

    member_mask: real members (targets and present references); False = padding.
    ref_mask:    known references (a subset of member_mask); the rest of the members are targets.
    """

    member_mask: jnp.ndarray
    ref_mask: jnp.ndarray

    @property
    def target_mask(self) -> jnp.ndarray:
        return self.member_mask & ~self.ref_mask


def branch_inputs(layout: SetLayout, context_text: jnp.ndarray, context_empty: jnp.ndarray,
                  image_guidance: bool = True, part_contexts: jnp.ndarray | None = None,
                  order: str = "image_first"):
    """Builds the branches' member masks, reference masks and contexts, stacked on axis 0.

    context_text:  (B, N, T, D) every member's caption embedding (targets: their prompts,
                   references: their captions).
    context_empty: (B, N, T, D) the empty-prompt embedding, used for targets in the noT branches.
    part_contexts: optional (P, B, N, T, D) composed prompts: the targets' part j in text branch j
                   (references keep their captions in every branch); replaces the targets' context_text.
    order: "image_first" (BRANCHES) or "text_first" (TEXT_FIRST_BRANCHES); see the module docstring.
    Returns member_mask (GB, N), ref_mask (GB, N), context (GB, N, T, D), in the order of BRANCHES
    (TEXT_FIRST_BRANCHES for "text_first"; TEXT_BRANCHES when image_guidance is False), the text
    branch repeated once per part.
    """
    check_order(order, 1 if part_contexts is None else part_contexts.shape[0])
    refs = layout.ref_mask
    targets = layout.target_mask
    no_refs = jnp.zeros_like(refs)
    # noT: targets get the empty prompt, references keep their own captions.
    is_target = targets[:, :, None, None]  # (B, N, 1, 1)
    context_no_text = jnp.where(is_target, context_empty, context_text)  # (B, N, T, D)
    if part_contexts is None:
        text_branches = [context_text]
    else:  # one text branch per part: (B, N, T, D) each
        text_branches = [jnp.where(is_target, part, context_text) for part in part_contexts]
    p = len(text_branches)
    if not image_guidance:
        member_mask = jnp.concatenate([layout.member_mask] * (1 + p), axis=0)  # ((1+P)B, N)
        ref_mask = jnp.concatenate([refs] * (1 + p), axis=0)  # ((1+P)B, N)
        return member_mask, ref_mask, jnp.concatenate([context_no_text] + text_branches, axis=0)
    if order == "text_first":  # noI_noT, noI_T, I_T; references removed by the member mask, as in noI_noT
        member_mask = jnp.concatenate([targets, targets, layout.member_mask], axis=0)  # (3B, N)
        ref_mask = jnp.concatenate([no_refs, no_refs, refs], axis=0)  # (3B, N)
        return member_mask, ref_mask, jnp.concatenate([context_no_text] + text_branches * 2, axis=0)
    member_mask = jnp.concatenate([targets] + [layout.member_mask] * (1 + p), axis=0)  # ((2+P)B, N)
    ref_mask = jnp.concatenate([no_refs] + [refs] * (1 + p), axis=0)  # ((2+P)B, N)
    context = jnp.concatenate([context_no_text, context_no_text] + text_branches, axis=0)  # ((2+P)B, N, T, D)
    return member_mask, ref_mask, context


def combine(outputs: jnp.ndarray, image_scale, text_scale, image_guidance: bool = True,
            part_weights: jnp.ndarray | None = None, order: str = "image_first") -> jnp.ndarray:
    """outputs (GB, N, ...) in branch_inputs' order -> guided (B, N, ...).

    part_weights: (P, B, N) weights of the P text branches of composed prompts (None: one text branch).
    order: the order branch_inputs built the branches in (module docstring)."""
    p = 1 if part_weights is None else part_weights.shape[0]
    check_order(order, p)
    branches = jnp.split(outputs, num_branches(image_guidance, p), axis=0)
    if image_guidance and order == "text_first":
        no_i_no_t, no_i_text, full = branches  # each (B, N, ...)
        return no_i_no_t + text_scale * (no_i_text - no_i_no_t) + image_scale * (full - no_i_text)
    if not image_guidance:
        base = no_text = branches[0]
    else:
        no_i_no_t, no_text = branches[0], branches[1]
        base = no_i_no_t + image_scale * (no_text - no_i_no_t)
    texts = branches[-p:]  # each (B, N, ...)
    if part_weights is None:
        return base + text_scale * (texts[0] - no_text)
    extra = (1,) * (outputs.ndim - 2)
    delta = sum(part_weights[j].reshape(part_weights.shape[1:] + extra).astype(outputs.dtype) * (texts[j] - no_text)
                for j in range(p))
    return base + text_scale * delta
