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
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import struct

BRANCHES = ("noI_noT", "I_noT", "I_T")
TEXT_BRANCHES = ("noT", "T")


def num_branches(image_guidance: bool) -> int:
    return len(BRANCHES) if image_guidance else len(TEXT_BRANCHES)


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
                  image_guidance: bool = True):
    """Builds the branches' member masks, reference masks and contexts, stacked on axis 0.

    context_text:  (B, N, T, D) every member's caption embedding (targets: their prompts,
                   references: their captions).
    context_empty: (B, N, T, D) the empty-prompt embedding, used for targets in the noT branches.
    Returns member_mask (3B, N), ref_mask (3B, N), context (3B, N, T, D), in the order of BRANCHES
    (or (2B, ...) in the order of TEXT_BRANCHES when image_guidance is False).
    """
    refs = layout.ref_mask
    targets = layout.target_mask
    no_refs = jnp.zeros_like(refs)
    # noT: targets get the empty prompt, references keep their own captions.
    is_target = targets[:, :, None, None]  # (B, N, 1, 1)
    context_no_text = jnp.where(is_target, context_empty, context_text)  # (B, N, T, D)
    if not image_guidance:
        member_mask = jnp.concatenate([layout.member_mask] * 2, axis=0)  # (2B, N)
        ref_mask = jnp.concatenate([refs] * 2, axis=0)  # (2B, N)
        return member_mask, ref_mask, jnp.concatenate([context_no_text, context_text], axis=0)
    member_mask = jnp.concatenate([targets, layout.member_mask, layout.member_mask], axis=0)  # (3B, N)
    ref_mask = jnp.concatenate([no_refs, refs, refs], axis=0)  # (3B, N)
    context = jnp.concatenate([context_no_text, context_no_text, context_text], axis=0)  # (3B, N, T, D)
    return member_mask, ref_mask, context


def combine(outputs: jnp.ndarray, image_scale, text_scale, image_guidance: bool = True) -> jnp.ndarray:
    """outputs (3B, ...) in BRANCHES order (or (2B, ...) in TEXT_BRANCHES order) -> guided (B, ...)."""
    if not image_guidance:
        no_t, t = jnp.split(outputs, 2, axis=0)
        return no_t + text_scale * (t - no_t)
    no_i_no_t, i_no_t, i_t = jnp.split(outputs, 3, axis=0)
    return no_i_no_t + image_scale * (i_no_t - no_i_no_t) + text_scale * (i_t - i_no_t)
