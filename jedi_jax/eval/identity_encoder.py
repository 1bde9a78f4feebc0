"""MiniBench's identity encoder: a small CNN trained contrastively to tell mini-world SUBJECTS apart
regardless of their CONTEXT (our stand-in for DreamBench's DINO / CLIP-I image similarity).

Why contrastive: a subject's identity in the mini world is its palette, texture, proportions and
mark -- exactly what captions cannot say -- while backgrounds, placement, size, tilt and jitter are
nuisance. SimCLR/InfoNCE (Chen et al. 2020) with positives = the SAME subject rendered in two
different contexts and negatives = the other subjects of the batch learns precisely that
invariance. Half of each batch's subjects share a category with many others (4 categories x 16
subjects), so the negatives include hard same-shape subjects and the encoder cannot get away with
recognising the category word. Augmentations imitate generated images (blur of the VAE decoder,
noise, slight brightness changes, flips; never hue: colour is identity), see ``cnn.augment``.

Trained on TRAIN-split subjects only; validated by retrieval on TEST-split subjects (never seen):
a query render must find the same subject, rendered in another context, among 32 candidates
(chance 1/32), both among random subjects and among 32 subjects of the SAME category (hard), with
clean and with blurred queries.

    python -m jedi_jax.eval.identity_encoder --train        # ~8 CPU minutes (2 cores); writes the shipped weights
    python -m jedi_jax.eval.identity_encoder --validate     # retrieval accuracy of the shipped weights
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jedi_jax.data import mini_world as mw
from jedi_jax.eval import cnn

NAME = "identity_encoder"
CONFIG = cnn.CNNConfig(widths=(16, 32, 64, 96), pool="mean_max", hidden=256, out_dim=128)


class IdentityEncoder(cnn.Evaluator):
    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (M, H, W, 3) -> L2-normalized embeddings (M, D); cosine similarity = dot product."""
        z = self.outputs(images)
        return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-8)


@functools.lru_cache(maxsize=2)
def load_identity_encoder(folder: str | None = None) -> IdentityEncoder:
    return IdentityEncoder(*cnn.load(NAME, folder or cnn.WEIGHTS_DIR))


# ---------------------------------------------------------------------------------- data


def render_views(split: str, indices, views: int, contexts: str, seed: int) -> np.ndarray:
    """uint8 (len(indices), views, 64, 64, 3): each subject in `views` contexts with distinct backgrounds."""
    out = np.empty((len(indices), views, mw.RES, mw.RES, 3), np.uint8)
    for a, i in enumerate(indices):
        subject = mw.subject_for(split, int(i))
        rng = np.random.default_rng([seed, int(i)])
        used: list[int] = []
        for v in range(views):
            ctx = mw.sample_context(rng, contexts, exclude_backgrounds=used)
            used.append(ctx.background)
            out[a, v] = mw.render(subject, ctx)[0]
    return out


def subjects_by_category(split: str, per_category: int, start: int = 0) -> dict[int, list[int]]:
    """{category: the first `per_category` subject indices of that category in `split`}."""
    out: dict[int, list[int]] = {c: [] for c in range(len(mw.CATEGORIES))}
    i = start
    while min(len(v) for v in out.values()) < per_category:
        c = mw.subject_for(split, i).category
        if len(out[c]) < per_category:
            out[c].append(i)
        i += 1
    return out


# ---------------------------------------------------------------------------------- training


def info_nce(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """NT-Xent over 2B embeddings: each view's positive is the other view of its subject.
    Returns (loss, top-1 accuracy of finding the positive)."""
    z = jnp.concatenate([z1, z2], axis=0)
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -1e9, logits)
    target = jnp.concatenate([jnp.arange(n) + n, jnp.arange(n)])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == target)


def train(*, steps: int = 1000, num_subjects: int = 2000, views: int = 4, categories_per_batch: int = 4,
          subjects_per_category: int = 16, lr: float = 2e-3, temperature: float = 0.1, seed: int = 0,
          log_every: int = 50) -> tuple[dict, dict]:
    """Trains the encoder on a pool of `num_subjects` train subjects x `views` contexts.
    Returns (params, training info)."""
    start = time.time()
    pool = render_views("train", range(num_subjects), views, "train", seed=101)  # (S, V, 64, 64, 3)
    cats = np.array([mw.subject_for("train", i).category for i in range(num_subjects)])
    by_cat = [np.flatnonzero(cats == c) for c in range(len(mw.CATEGORIES))]
    print(f"[identity] pool {pool.shape} rendered in {time.time() - start:.0f} s", flush=True)

    functional, params = cnn.create(CONFIG, seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 10 + 1), steps, lr * 0.05)
    tx = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, v1, v2):
        def loss_fn(p):
            net = functional.bind(p)
            return info_nce(net(v1), net(v2), temperature)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    rng = np.random.default_rng(seed)
    history = []
    for i in range(steps):
        if i % 2 == 0:  # hard batches: few categories, many subjects each
            chosen = rng.choice(len(by_cat), categories_per_batch, replace=False)
            idx = np.concatenate([rng.choice(by_cat[c], subjects_per_category,
                                             replace=len(by_cat[c]) < subjects_per_category) for c in chosen])
        else:  # random subjects
            idx = rng.choice(num_subjects, categories_per_batch * subjects_per_category, replace=False)
        pair = np.stack([rng.choice(views, 2, replace=False) for _ in idx])
        v1, _ = cnn.augment(rng, cnn.to_input(pool[idx, pair[:, 0]]), flip=True)
        v2, _ = cnn.augment(rng, cnn.to_input(pool[idx, pair[:, 1]]), flip=True)
        params, opt_state, loss, acc = step(params, opt_state, v1, v2)
        if i % log_every == 0 or i == steps - 1:
            history.append((i, float(loss), float(acc)))
            print(f"[identity] step {i:5d} loss {float(loss):.3f} batch acc {float(acc):.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    info = dict(steps=steps, num_subjects=num_subjects, views=views, lr=lr, temperature=temperature, seed=seed,
                batch=2 * categories_per_batch * subjects_per_category, seconds=round(time.time() - start, 1),
                history=history)
    return params, info


# ---------------------------------------------------------------------------------- validation


def _retrieval(emb_q: np.ndarray, emb_c: np.ndarray, groups: list[np.ndarray]) -> float:
    """Top-1 accuracy: query i must be closest to candidate i within its group."""
    hits = []
    for g in groups:
        sims = emb_q[g] @ emb_c[g].T
        hits.append(np.argmax(sims, axis=1) == np.arange(len(g)))
    return float(np.mean(np.concatenate(hits)))


def validate(encoder: IdentityEncoder, *, per_category: int = 32, candidates: int = 32, seed: int = 7) -> dict:
    """Retrieval accuracy on TEST-split subjects (never seen in training), chance = 1/candidates.

    random: groups of `candidates` random test subjects; same_category: groups of `candidates`
    subjects sharing a category (only identity tells them apart); *_blurred: queries blurred by a
    5x5 binomial filter (like a VAE decode). Queries and candidates are renders in different test
    contexts (half of them held-out (background, placement) pairs); both directions are averaged.
    """
    by_cat = subjects_by_category("test", per_category)
    ids = np.array([i for c in sorted(by_cat) for i in by_cat[c]])
    views = render_views("test", ids, 2, "test", seed=seed)  # (S, 2, 64, 64, 3)
    e0, e1 = encoder.embed(views[:, 0]), encoder.embed(views[:, 1])
    blurred = cnn.blur(cnn.to_input(views[:, 0]))
    e0b = encoder.embed(((blurred + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ids))
    random_groups = [perm[i:i + candidates] for i in range(0, len(ids) - candidates + 1, candidates)]
    same_groups = [np.arange(c * per_category, (c + 1) * per_category)[:candidates] for c in range(len(by_cat))]
    pos = float(np.mean(np.sum(e0 * e1, -1)))
    neg = float(np.mean((e0 @ e1.T)[~np.eye(len(ids), dtype=bool)]))
    return dict(
        num_subjects=int(len(ids)), candidates=candidates, chance=1.0 / candidates,
        random=(_retrieval(e0, e1, random_groups) + _retrieval(e1, e0, random_groups)) / 2,
        same_category=(_retrieval(e0, e1, same_groups) + _retrieval(e1, e0, same_groups)) / 2,
        random_blurred=_retrieval(e0b, e1, random_groups),
        same_category_blurred=_retrieval(e0b, e1, same_groups),
        mean_cos_same_subject=pos, mean_cos_other_subjects=neg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.eval.identity_encoder",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train and write the weights (then validate)")
    p.add_argument("--validate", action="store_true", help="retrieval accuracy of the weights in --out")
    p.add_argument("--out", default=str(cnn.WEIGHTS_DIR), help="weights folder")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--subjects", type=int, default=2000, help="train subjects in the render pool")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.train or args.validate):
        p.error("give --train and/or --validate")
    if args.train:
        params, info = train(steps=args.steps, num_subjects=args.subjects, seed=args.seed)
        meta = dict(config=CONFIG.to_dict(), training=info,
                    retrain=f"python -m jedi_jax.eval.identity_encoder --train --steps {args.steps} "
                            f"--subjects {args.subjects} --seed {args.seed}")
        cnn.save(NAME, params, meta, args.out)
        load_identity_encoder.cache_clear()
    encoder = load_identity_encoder(args.out)
    val = validate(encoder)
    meta = dict(encoder.meta, validation=val)
    (Path(args.out) / f"{NAME}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(val, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
