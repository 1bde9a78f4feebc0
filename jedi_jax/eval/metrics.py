"""MiniBench's per-image scores and their aggregation (means, normalization, 95% bootstrap CIs).

Per generated image (see ``minibench.py`` for where the inputs come from):

* ``enc_ref``: identity, encoder-based (DreamBench's DINO score, our encoder): mean cosine
  similarity between the image's identity embedding and the embeddings of the subject's k=3
  REFERENCE renders (the same 3 for every row, whatever the row was shown).
* ``enc_gallery``: the same against 3 further renders of the subject in test contexts that no row
  was shown. Unlike ``enc_ref`` this cannot be gamed by pasting a reference (the copy row).
* ``pix``: identity, model-free: colour-palette and texture statistics of the SUBJECT's pixels.
  A generated image has no mask, so we use the foreground mask of the GROUND-TRUTH render of the
  same prompted context (the prompt fixes placement and size; ``jitter=False`` contexts), eroded by
  one pixel to drop the anti-aliased outline. The references use their own render masks. Hence
  ``pix`` also drops when the subject is generated in the wrong place or size (the mask then
  covers background): it is "the right colours and texture where the prompt says the subject is",
  and we report it as such. ``pix = (palette + texture) / 2`` with
    - palette: histogram intersection of 4x4x4-bin RGB histograms (64 bins, L1-normalized) of the
      masked pixels vs all reference foreground pixels pooled;
    - texture: histogram intersection of 8-bin histograms of the luminance gradient magnitude
      (|dx| + |dy|) inside the masks (stripe/dot contrast and density; rotation-invariant).
* ``background_ok`` / ``placement_ok`` (and size / orientation): the context classifier's reading
  equals the prompt's label.

Aggregation: scores are averaged per SUBJECT first (over prompts and seeds), and every CI is a
95% BOOTSTRAP OVER SUBJECTS (2000 resamples, fixed seed): subjects are the independent unit,
prompts and seeds of one subject are not independent. Rows are resampled jointly (the same
subjects in every row of a resample), which is what makes the normalized score's CI honest:

    normalized(row) = (mean(row) - mean(text-only)) / (mean(ground truth) - mean(text-only))

computed on each resample's subject means, so ground truth is 1 and text-only 0 by construction.

The interval is the EXPANDED percentile interval (Hesterberg 2015, "What teachers should know about
the bootstrap", sec. 5): the plain 2.5/97.5 percentiles of a bootstrap over n subjects are too
narrow at the n MiniBench uses (their coverage, simulated on normal subject means: 0.80 at n=4,
0.83-0.86 at 6, 0.91 at 12), because the bootstrap variance carries a (n-1)/n factor and a z quantile
stands where a t quantile belongs. The expanded interval takes the percentiles at
Phi(-sqrt(n/(n-1)) t_{n-1, 0.975}) and its complement instead (coverage 0.93 at n=5..8, 0.95 at 12
and 40; tests/test_eval_minibench.py simulates it). Below MIN_CI_SUBJECTS subjects even that
covers too little (0.87 at n=4, 0.5 at n=2), so no CI is given; nor when every resample is the
same (every subject scored the same: a zero-width interval would read as certainty).
Scores computed before session 20 used the plain percentiles (assets/jedi_mini/EXPERIMENTS.md).
"""
from __future__ import annotations

import numpy as np

PALETTE_BINS = 4  # per channel -> 64 colours
TEXTURE_EDGES = np.array([0, 3, 6, 10, 16, 24, 36, 56, np.inf], np.float32)  # gradient magnitude, 0..255 scale
BOOTSTRAP_SAMPLES = 2000
CI_LEVEL = 0.95
MIN_CI_SUBJECTS = 5  # fewer: no CI (module docstring)


# ---------------------------------------------------------------------------------- per image


def erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary erosion with a 3x3 cross (numpy only)."""
    m = np.asarray(mask, bool)
    for _ in range(iterations):
        p = np.pad(m, 1, constant_values=False)
        m = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def _palette_hist(pixels: np.ndarray) -> np.ndarray:
    """uint8 (P, 3) -> (64,) normalized histogram."""
    q = (pixels.astype(np.int32) * PALETTE_BINS) // 256
    idx = (q[:, 0] * PALETTE_BINS + q[:, 1]) * PALETTE_BINS + q[:, 2]
    h = np.bincount(idx, minlength=PALETTE_BINS ** 3).astype(np.float64)
    return h / max(h.sum(), 1.0)


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    y = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    gx = np.zeros_like(y)
    gy = np.zeros_like(y)
    gx[:, 1:-1] = (y[:, 2:] - y[:, :-2]) / 2
    gy[1:-1] = (y[2:] - y[:-2]) / 2
    return np.abs(gx) + np.abs(gy)


def _texture_hist(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    g = _gradient_magnitude(image)[mask]
    h = np.histogram(g, bins=TEXTURE_EDGES)[0].astype(np.float64)
    return h / max(h.sum(), 1.0)


def intersection(h1: np.ndarray, h2: np.ndarray) -> float:
    return float(np.minimum(h1, h2).sum())


class PixelReference:
    """The subject's pooled foreground statistics from its reference renders (computed once)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        masks = [erode(m) for m in masks]
        self.palette = _palette_hist(np.concatenate([im[m] for im, m in zip(images, masks)]))
        tex = [_texture_hist(im, m) * m.sum() for im, m in zip(images, masks)]
        self.texture = np.sum(tex, 0) / max(np.sum(tex), 1.0)

    def score(self, image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
        """image uint8 (64, 64, 3) scored inside `mask` (the prompted context's ground-truth mask)."""
        m = erode(mask)
        if m.sum() == 0:
            m = np.asarray(mask, bool)
        palette = intersection(_palette_hist(image[m]), self.palette)
        texture = intersection(_texture_hist(image, m), self.texture)
        return dict(pix=(palette + texture) / 2, palette=palette, texture=texture)


def cosine_to_set(embedding: np.ndarray, others: np.ndarray) -> float:
    """Mean cosine similarity of one L2-normalized embedding (D,) to each row of others (M, D)."""
    return float(np.mean(others @ embedding))


# ---------------------------------------------------------------------------------- aggregation


def subject_means(records: list[dict], key: str, subjects: list) -> np.ndarray:
    """(S,) per-subject mean of records[key] (NaN for a subject the row did not run)."""
    out = np.full((len(subjects),), np.nan)
    for i, s in enumerate(subjects):
        vals = [float(r[key]) for r in records if r["subject"] == s and r.get(key) is not None]
        if vals:
            out[i] = np.mean(vals)
    return out


def bootstrap_indices(num_subjects: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """(samples, S) subject indices drawn with replacement; shared by every row (paired resampling)."""
    return np.random.default_rng(seed).integers(0, num_subjects, (samples, num_subjects))


def interval_percentiles(n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """(lo, hi) percentiles (0..100) of the expanded percentile interval for n subjects (module
    docstring): alpha/2 becomes Phi(-sqrt(n / (n - 1)) * t_{n-1, 1 - alpha/2})."""
    from scipy import stats

    z = np.sqrt(n / (n - 1)) * stats.t.ppf(1 - (1 - level) / 2, n - 1)
    tail = 100 * float(stats.norm.cdf(-z))
    return tail, 100 - tail


def _interval(point: float, boot: np.ndarray, n: int, **extra) -> dict:
    """{'mean', 'lo', 'hi', 'n', ...}; lo = hi = None with 'why' where no interval is honest."""
    out = dict(mean=float(point), lo=None, hi=None, n=int(n), **extra)
    if n < MIN_CI_SUBJECTS:
        return dict(out, why=f"n={n}")
    if np.ptp(boot) <= 1e-9:
        return dict(out, why=f"all {n} subjects scored the same")
    lo, hi = np.percentile(boot, interval_percentiles(n))
    return dict(out, lo=float(lo), hi=float(hi))


def mean_ci(per_subject: np.ndarray, idx: np.ndarray) -> dict:
    """{'mean', 'lo', 'hi', 'n'}: mean over subjects and its 95% expanded-percentile bootstrap CI
    (lo = hi = None, with 'why', below MIN_CI_SUBJECTS subjects or when every subject scored the same)."""
    ok = ~np.isnan(per_subject)
    if not ok.any():
        return dict(mean=None, lo=None, hi=None, n=0)
    x = per_subject[ok]
    if len(x) < MIN_CI_SUBJECTS:
        return _interval(x.mean(), x, len(x))
    return _interval(x.mean(), x[_restrict(idx, ok)].mean(axis=1), len(x))


def _restrict(idx: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Bootstrap indices over only the subjects where `ok` (re-drawn deterministically if some are
    missing, so that rows run on a subset, e.g. DreamBooth, still get an honest CI)."""
    n = int(ok.sum())
    if n == len(ok):
        return idx
    return np.random.default_rng(idx.shape[0] + n).integers(0, n, (idx.shape[0], n))


def normalized_ci(row: np.ndarray, zero: np.ndarray, one: np.ndarray, idx: np.ndarray) -> dict:
    """(mean(row) - mean(zero)) / (mean(one) - mean(zero)) on subjects present in all three, with
    its paired 95% bootstrap CI. A resample whose denominator is ~0 is dropped (counted in 'dropped').

    No CI (lo = hi = None) below MIN_CI_SUBJECTS subjects, when every resample is the same, or when
    the denominator's own 95% interval reaches 0 ('unbounded': True): ground truth is then not clearly
    above the 0 point, resampled ratios swing through +-infinity, and their percentiles would print as
    an ordinary but meaningless interval.
    """
    ok = ~(np.isnan(row) | np.isnan(zero) | np.isnan(one))
    if not ok.any():
        return dict(mean=None, lo=None, hi=None, n=0, dropped=0)
    r, z, o = row[ok], zero[ok], one[ok]
    den = o.mean() - z.mean()
    point = (r.mean() - z.mean()) / den if abs(den) > 1e-9 else float("nan")
    if len(r) < MIN_CI_SUBJECTS:
        return _interval(point, r, len(r), dropped=0)
    sub = _restrict(idx, ok)
    bden = o[sub].mean(1) - z[sub].mean(1)
    good = np.abs(bden) > 1e-9
    den_lo, den_hi = np.percentile(bden, interval_percentiles(len(r)))
    if den_lo <= 0 <= den_hi:
        return dict(mean=float(point), lo=None, hi=None, n=int(ok.sum()), dropped=int((~good).sum()),
                    unbounded=True, why="ground truth not clearly above text-only")
    boot = (r[sub].mean(1) - z[sub].mean(1))[good] / bden[good]
    return _interval(point, boot, len(r), dropped=int((~good).sum()))


def fmt_ci(stat: dict, digits: int = 3) -> str:
    """'0.812 [0.790, 0.833]' (or 'n/a'; the mean alone, saying why, where there is no CI)."""
    if not stat or stat.get("mean") is None or not np.isfinite(stat["mean"]):
        return "n/a"
    if stat.get("lo") is None:
        why = stat.get("why") or ("ground truth not clearly above text-only" if stat.get("unbounded")
                                  else f"n={stat.get('n')}")  # results.json written before 'why' existed
        return f"{stat['mean']:.{digits}f} [no CI: {why}]"
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"
