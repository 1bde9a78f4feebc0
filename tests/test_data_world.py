"""The procedural mini world: determinism, splits, identity, captions/tokenizer, speed, assets."""
import filecmp
import os
import time

import numpy as np
import pytest

from jedi_jax.data import examples, mini_world as mw, tokenizer_files
from jedi_jax.data.set_source import MiniWorldSource


def test_lists_and_sizes():
    assert len(mw.CATEGORIES) >= 8 and len(set(mw.CATEGORIES)) == len(mw.CATEGORIES)
    assert len(mw.BACKGROUNDS) >= 8 and len(set(mw.BACKGROUNDS)) == len(mw.BACKGROUNDS)
    assert len(mw.PLACEMENTS) >= 3
    s = mw.make_set("train", 0, n=5)
    assert s["images"].shape == (5, 64, 64, 3) and s["images"].dtype == np.uint8
    assert s["masks"].shape == (5, 64, 64) and s["masks"].dtype == bool
    assert len(s["captions"]) == 5 and isinstance(s["subject"], str)
    for k in ("category", "background", "placement", "size", "orientation", "subject_id"):
        assert s["labels"][k].shape == (5,)


def test_determinism():
    a, b = mw.make_set("train", 7, n=4), mw.make_set("train", 7, n=4)
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["masks"], b["masks"])
    assert a["captions"] == b["captions"] and a["subject"] == b["subject"]
    mw.subject_for.cache_clear()  # also from a cold cache
    c = mw.make_set("train", 7, n=4)
    assert np.array_equal(a["images"], c["images"])
    subj, ctx = mw.sample_subject(123), mw.make_context("beach", "left", "large", "tilted", seed=5)
    assert subj == mw.sample_subject(123)
    assert np.array_equal(mw.render(subj, ctx)[0], mw.render(subj, ctx)[0])
    assert not np.array_equal(a["images"], mw.make_set("train", 8, n=4)["images"])
    assert not np.array_equal(a["images"], mw.make_set("test", 7, n=4)["images"])


def test_train_test_subjects_disjoint():
    train = [mw.subject_for("train", i) for i in range(300)]
    test = [mw.subject_for("test", i) for i in range(300)]
    assert not {s.name for s in train} & {s.name for s in test}
    assert not {s.seed for s in train} & {s.seed for s in test}
    assert not {s.colors for s in train} & {s.colors for s in test}
    assert {s.category for s in train} == set(range(len(mw.CATEGORIES)))
    assert mw.subject_from_name(test[5].name) == test[5]
    # heldout shares the test subjects
    assert mw.make_set("heldout", 3, n=2)["subject"] == mw.make_set("test", 3, n=2)["subject"]


def test_heldout_contexts_never_in_train():
    held = set(mw.HELDOUT_COMBO_IDS)
    assert len(held) >= 6 and not held & set(mw.TRAIN_COMBOS)
    # every background and every placement is still seen in training, only the pairs are new
    assert {b for b, _ in mw.TRAIN_COMBOS} == set(range(len(mw.BACKGROUNDS)))
    assert {p for _, p in mw.TRAIN_COMBOS} == set(range(len(mw.PLACEMENTS)))
    seen_train, seen_test = set(), set()
    for i in range(150):
        lab = mw.make_set("train", i, n=4)["labels"]
        seen_train |= set(zip(lab["background"].tolist(), lab["placement"].tolist()))
        lab = mw.make_set("test", i, n=4)["labels"]
        seen_test |= set(zip(lab["background"].tolist(), lab["placement"].tolist()))
    assert not seen_train & held
    assert seen_train == set(mw.TRAIN_COMBOS)
    assert held <= seen_test
    rng = np.random.default_rng(0)
    assert all((c.background, c.placement) in held
               for c in (mw.sample_context(rng, "heldout") for _ in range(50)))


def test_same_category_subjects_differ_clearly():
    ctx = mw.make_context("studio", "center", "large", "upright", jitter=False)
    for cat in range(len(mw.CATEGORIES)):
        for k in range(4):
            a = mw.sample_subject(1000 * cat + 2 * k, category=cat)
            b = mw.sample_subject(1000 * cat + 2 * k + 1, category=cat)
            (ia, ma), (ib, mb) = mw.render(a, ctx), mw.render(b, ctx)
            both = ma & mb
            assert both.sum() > 200
            diff = np.abs(ia.astype(np.float32) - ib)[both].mean()
            assert diff > 30, (mw.CATEGORIES[cat], k, diff)  # /255 per channel, on the object


def test_masks_and_labels_match_the_pixels():
    subj = mw.sample_subject(5, category="box")
    xs, areas = {}, {}
    for p in range(3):
        for s in range(2):
            ctx = mw.make_context("grass", p, s, "upright", jitter=False)
            img, mask = mw.render(subj, ctx)
            bg = mw.render_background(ctx)
            frac = mask.mean()
            assert 0.04 < frac < 0.6
            # pixels outside the (slightly grown) mask are the background's
            grown = mask.copy()
            for ax in (0, 1):
                for sh in (-2, -1, 1, 2):
                    grown |= np.roll(mask, sh, axis=ax)
            assert np.array_equal(img[~grown], bg[~grown])
            xs[p, s] = np.nonzero(mask)[1].mean()
            areas[p, s] = mask.sum()
            extent = np.nonzero(mask.any(1))[0]
            assert 0.3 <= (extent[-1] - extent[0] + 1) / 64 <= 0.62  # object height 30-60%
    for s in range(2):
        assert xs[0, s] < xs[1, s] - 6 < xs[2, s] - 12
    for p in range(3):
        assert areas[p, 1] > 1.8 * areas[p, 0]


def test_captions_vocabulary_and_tokenizer():
    vocab = set(mw.vocabulary())
    tok = tokenizer_files.load_tokenizer()
    ids_of = {w: tok(w, add_special_tokens=False).input_ids for w in vocab}
    assert all(len(ids) == 1 for ids in ids_of.values()), {w: i for w, i in ids_of.items() if len(i) != 1}
    assert len(set(i[0] for i in ids_of.values())) == len(vocab)
    assert len(tok) < 400
    for i in range(60):
        s = mw.make_set("train" if i % 2 else "test", i, n=4)
        for c, cat, bg in zip(s["captions"], s["labels"]["category"], s["labels"]["background"]):
            words = c.split()
            assert set(words) <= vocab, c
            assert mw.CATEGORIES[cat] in words and f" {mw.BACKGROUNDS[bg]} " in f" {c} ", c
            assert mw.parse_caption(c)["category"] == cat and mw.parse_caption(c)["background"] == bg
            ids = tok(c).input_ids
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert len(ids) == len(words) + 2 <= mw.max_caption_words() + 2, c
            assert tok.decode(ids, skip_special_tokens=True) == c
    ctx = mw.make_context("night sky", "right", "small", "tilted")
    assert mw.parse_caption(mw.prompt_for("kite", ctx)) == dict(
        category=mw.CATEGORIES.index("kite"), background=ctx.background, placement=2, size=0, orientation=1)


def test_shipped_tokenizer_is_up_to_date(tmp_path):
    tokenizer_files.write_tokenizer_folder(str(tmp_path))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert filecmp.cmp(tmp_path / name, os.path.join(tokenizer_files.PACKAGED_DIR, name), shallow=False), name


def test_render_speed():
    mw.make_set("train", 10_000, n=4)
    times = []
    for i in range(15):
        t = time.process_time()
        mw.make_set("train", 10_001 + i, n=4)  # fresh subjects: includes subject sampling
        times.append(time.process_time() - t)
    best, median = min(times), float(np.median(times))
    print(f"set of 4 renders: best {best * 1e3:.2f} ms, median {median * 1e3:.2f} ms (CPU time)")
    assert median < 0.010


def test_examples_assets():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(examples.EXAMPLES_DIR) for f in fs)
    tok_total = sum(os.path.getsize(os.path.join(tokenizer_files.PACKAGED_DIR, f))
                    for f in os.listdir(tokenizer_files.PACKAGED_DIR))
    assert total + tok_total < 500_000
    exs = examples.load_examples()
    assert len(exs) == 3 and len({e["category"] for e in exs}) == 3
    held = set(mw.HELDOUT_COMBO_IDS)
    for e in exs:
        assert e["name"].startswith("test_") and e["images"].shape == (3, 64, 64, 3)
        for img, ctx, cap in zip(e["images"], e["reference_contexts"], e["captions"]):
            again, _ = mw.render(e["subject"], ctx)
            d = np.abs(again.astype(int) - img)
            assert d.max() <= 3 and (d > 0).mean() < 0.01  # assets match the current world
            assert (ctx.background, ctx.placement) not in held
            assert e["category"] in cap.split()
        for p in e["prompts"]:
            ctx = mw.Context(**p["context"])
            assert (ctx.background, ctx.placement) in held and p["heldout"]
            assert mw.parse_caption(p["prompt"]) == dict(category=mw.CATEGORIES.index(e["category"]),
                                                         **ctx.labels)
            gt, mask = mw.render_in_context(e["subject"], ctx)
            assert gt.shape == (64, 64, 3) and mask.any()


def test_render_in_context_from_labels():
    subj = mw.subject_for("test", 1)
    a, ma = mw.render_in_context(subj, background="snow", placement="right", size="large")
    b, mb = mw.render(subj, mw.make_context("snow", "right", "large", "upright", jitter=False))
    assert np.array_equal(a, b) and np.array_equal(ma, mb)


def test_mini_world_source():
    src = MiniWorldSource("train", num_sets=10, set_size=3, num_subjects=4, with_labels=True)
    assert len(src) == 10
    r = src[5]
    assert set(r) >= {"images", "captions", "masks", "subject"}
    assert r["images"].shape == (3, 64, 64, 3) and r["masks"].dtype == bool
    assert r["subject"] == src[1]["subject"]  # 5 % 4 == 1: same subject, other contexts
    assert not np.array_equal(r["images"], src[1]["images"])
    assert r["labels"]["subject_id"].tolist() == [1, 1, 1]
    with pytest.raises(IndexError):
        src[10]
    assert "masks" not in MiniWorldSource("test", 2, with_masks=False)[0]


def test_pool_cache_writers_sharing_a_path_leave_one_whole_file(tmp_path):
    """Every process of a multi-process run writes the same pool cache to the same shared path: each
    through its own temporary file, so the file left is whole and no temporary file stays behind."""
    import threading

    from jedi_jax.data.pool import write_cache

    cache = str(tmp_path / "pool.npz")
    big = np.arange(2_000_000, dtype=np.float32)  # 8 MB: the writes overlap
    errors = []

    def write():
        try:
            write_cache(cache, latents=big, vae="fp")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with np.load(cache) as data:
        np.testing.assert_array_equal(data["latents"], big)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.npz"]


def test_render_pool_wordings_and_cache(tmp_path):
    """pool wording "world+prompt" re-words captions only: same renders, every caption still names
    its image's labels, MiniBench's wording appears; a cache of another wording is refused."""
    from jedi_jax.data.pool import RenderPool

    log = lambda *a: None  # noqa: E731
    world = RenderPool("train", 12, 4, processes=1, log=log)
    cache = tmp_path / "pool.npz"
    prompt = RenderPool("train", 12, 4, processes=1, cache=str(cache), wording="world+prompt", log=log)
    np.testing.assert_array_equal(world.images, prompt.images)
    assert (world.captions == np.array([mw.make_set("train", i, n=4)["captions"] for i in range(12)])).all()
    n_full = 0
    for i in range(12):
        s = mw.make_set("train", i, n=4)
        for ctx, text in zip(s["contexts"], prompt.captions[i]):
            got = mw.parse_caption(str(text))
            assert got["background"] == ctx.background and got["category"] == s["category"], (text, ctx)
            assert got["placement"] in (None, ctx.placement), (text, ctx)
            n_full += str(text) == mw.prompt_for(s["category"], ctx)  # MiniBench's wording, exactly
    assert n_full > 0
    assert (RenderPool("train", 12, 4, cache=str(cache), wording="world+prompt", log=log).captions
            == prompt.captions).all()
    with pytest.raises(ValueError, match="worded 'world\\+prompt'"):
        RenderPool("train", 12, 4, cache=str(cache), log=log)
    with pytest.raises(ValueError, match="unknown caption wording"):
        RenderPool("train", 2, 4, processes=1, wording="poetry", log=log)


def test_render_pool_first_set_gives_other_subjects_and_its_cache_says_so(tmp_path):
    """first_set=k: record j is make_set(split, k + j); pools [0, 4) and [4, 7) share no subject;
    a cache of one offset is refused for another."""
    from jedi_jax.data.pool import RenderPool
    from jedi_jax.data.set_source import MiniWorldSource

    log = lambda *a: None  # noqa: E731
    cache = tmp_path / "pool.npz"
    late = RenderPool("train", 3, 2, processes=1, first_set=4, cache=str(cache), log=log)
    early = RenderPool("train", 4, 2, processes=1, log=log)
    for j in range(3):
        s = mw.make_set("train", 4 + j, n=2)
        np.testing.assert_array_equal(late.images[j], s["images"])
        assert late.subjects[j] == s["subject"]
    assert not set(late.subjects) & set(early.subjects)
    on_the_fly = MiniWorldSource("train", 3, 2, first_set=4, with_masks=False)  # data.source="mini_world"
    assert [r["subject"] for r in (on_the_fly[0], on_the_fly[2])] == [late.subjects[0], late.subjects[2]]
    np.testing.assert_array_equal(on_the_fly[-1]["images"], late.images[2])
    np.testing.assert_array_equal(RenderPool("train", 3, 2, first_set=4, cache=str(cache), log=log).images, late.images)
    with pytest.raises(ValueError, match="from 4 of split train.*not \\(3, 2\\) from 0"):
        RenderPool("train", 3, 2, cache=str(cache), log=log)
    with pytest.raises(ValueError, match="first_set must be >= 0"):
        RenderPool("train", 3, 2, first_set=-1, log=log)
    # a cache of one subject per set is not a pool of 2 subjects (nor the reverse)
    with pytest.raises(ValueError, match="with a new subject per set, not .* with 2 subjects: delete it"):
        RenderPool("train", 3, 2, first_set=4, num_subjects=2, cache=str(cache), log=log)
    two = tmp_path / "two.npz"
    RenderPool("train", 3, 2, processes=1, num_subjects=2, cache=str(two), log=log)
    with pytest.raises(ValueError, match="with 2 subjects, not .* with a new subject per set"):
        RenderPool("train", 3, 2, cache=str(two), log=log)


def test_render_pool_keeps_subject_masks_and_refuses_a_cache_without_them(tmp_path):
    """The pool keeps each render's subject mask (for train.subject_weight): mask (j, r) is
    make_set's, records and the latent pool carry it, it round-trips through the cache, and a cache
    written before masks is refused with a line that says so."""
    from jedi_jax.data.pool import RenderPool

    log = lambda *a: None  # noqa: E731
    cache = tmp_path / "pool.npz"
    pool = RenderPool("train", 3, 2, processes=1, cache=str(cache), log=log)
    for j in range(3):
        s = mw.make_set("train", j, n=2)
        np.testing.assert_array_equal(pool.masks[j], s["masks"])
        np.testing.assert_array_equal(pool[j]["masks"], s["masks"])
    assert pool.masks.dtype == bool and 0 < pool.masks.mean() < 0.5  # the subject is a part of each render
    np.testing.assert_array_equal(RenderPool("train", 3, 2, cache=str(cache), log=log).masks, pool.masks)
    held = dict(np.load(cache))
    del held["masks"]
    np.savez(cache, **held)  # as written before pools kept masks
    with pytest.raises(ValueError, match="predates subject masks: delete it"):
        RenderPool("train", 3, 2, cache=str(cache), log=log)


def test_render_pool_placement_only_wording():
    """"world+prompt+place": the same renders; a caption that leaves the background unsaid names the
    image's placement (and category), and its words up to the placement are a full template's."""
    from jedi_jax.data.pool import PLACEMENT_ONLY, RenderPool

    log = lambda *a: None  # noqa: E731
    world = RenderPool("train", 16, 4, processes=1, log=log)
    place = RenderPool("train", 16, 4, processes=1, wording="world+prompt+place", log=log)
    np.testing.assert_array_equal(world.images, place.images)
    n_place_only = 0
    for i in range(16):
        s = mw.make_set("train", i, n=4)
        for ctx, text in zip(s["contexts"], place.captions[i]):
            got = mw.parse_caption(str(text))
            assert got["category"] == s["category"], text
            if got["background"] is None:
                n_place_only += 1
                assert got["placement"] == ctx.placement, (text, ctx)
            else:
                assert got["background"] == ctx.background and got["placement"] in (None, ctx.placement), (text, ctx)
    assert 0 < n_place_only < 64  # a share of the captions, not all
    for t in PLACEMENT_ONLY:
        assert "{bg" not in t and t.endswith("{place}")
        assert any(full.startswith(t) for full in mw.TEMPLATES + [mw.FULL_TEMPLATE]), t


def test_render_pool_placed_wording():
    """"placed": the same renders; every caption names its image's placement (the background-only
    captions that teach placement-given-background are gone); some name no background at all."""
    from jedi_jax.data.pool import RenderPool

    log = lambda *a: None  # noqa: E731
    world = RenderPool("train", 16, 4, processes=1, log=log)
    placed = RenderPool("train", 16, 4, processes=1, wording="placed", log=log)
    np.testing.assert_array_equal(world.images, placed.images)
    n_place_only = n_both = 0
    for i in range(16):
        s = mw.make_set("train", i, n=4)
        for ctx, text in zip(s["contexts"], placed.captions[i]):
            got = mw.parse_caption(str(text))
            assert got["category"] == s["category"] and got["placement"] == ctx.placement, (text, ctx)
            assert got["background"] in (None, ctx.background), (text, ctx)
            n_place_only += got["background"] is None
            n_both += got["background"] is not None
    assert n_place_only > 0 and n_both > 0
    # the world wording does have background-only captions, so the filter is doing something
    assert any(mw.parse_caption(str(t))["placement"] is None for t in world.captions.ravel())


def test_latent_pool_encodes_each_render_and_its_cache_is_strict(tmp_path):
    """LatentPool: latent (s, r) is the VAE's scaled posterior mean of render (s, r), whatever batch
    it fell in (the last batch is zero-padded); the cache round-trips bit for bit, and a cache of
    other renders or of another VAE is refused, not trained on."""
    import jax.numpy as jnp

    from jedi_jax.convert.param_io import params_fingerprint
    from jedi_jax.data.pool import LatentPool, RenderPool
    from jedi_jax.loading import load_component
    from jedi_jax.models.vae import scale_latents
    from jedi_jax.pipeline import default_model_dir

    log = lambda *a: None  # noqa: E731
    folder = str(default_model_dir())
    renders = RenderPool("train", 3, 2, processes=1, log=log)
    cache = tmp_path / "pool.latents.npz"
    pool = LatentPool(renders, folder, batch=4, cache=str(cache), log=log, progress=False)  # 6 renders: 4 + 2
    vae = load_component(folder, "vae")
    x = jnp.asarray(renders.images[2, 1:2], jnp.float32) / 127.5 - 1.0  # (1, 64, 64, 3), in the padded batch
    want = np.asarray(scale_latents(vae.functional.bind(vae.params).encode(x)[0], vae.config))[0]
    assert pool.latents.shape[:2] == (3, 2) and pool.latents.shape[-1] == 4
    np.testing.assert_allclose(pool.latents[2, 1], want, atol=1e-4)
    assert not np.allclose(pool.latents[0, 0], pool.latents[0, 1])  # different contexts, different latents
    assert pool[1]["captions"] == [str(c) for c in renders.captions[1]]
    np.testing.assert_array_equal(pool[1]["masks"], renders.masks[1])  # at render resolution, for the loss

    seen = []
    again = LatentPool(renders, folder, cache=str(cache), log=seen.append)
    np.testing.assert_array_equal(again.latents, pool.latents)
    assert "loaded latents" in seen[0] and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="delete it"):  # other renders (4 sets) against a 3-set cache
        LatentPool(RenderPool("train", 4, 2, processes=1, log=log), folder, cache=str(cache), log=log)
    with pytest.raises(ValueError, match="not renders"):  # same shape, other subjects (sets 3..5)
        LatentPool(RenderPool("train", 3, 2, processes=1, first_set=3, log=log), folder, cache=str(cache), log=log)
    held = dict(np.load(cache))
    np.savez(cache, **dict(held, vae="0" * 64))  # as if another VAE had encoded these renders
    with pytest.raises(ValueError, match="encoded by VAE 000000000000, not"):
        LatentPool(renders, folder, cache=str(cache), log=log)
    assert params_fingerprint(vae.params) == params_fingerprint(load_component(folder, "vae").params)


def test_mini_paint_primitives():
    """The painters mini_world composes: every background is a (3, 64, 64) image in [0, 1] that
    depends on its rng; every category's shape has an inside around the object's centre and an
    outside at the grid's corners; textures are blend weights in [0, 1]."""
    from jedi_jax.data import mini_paint as paint

    for name in mw.BACKGROUNDS:
        a = paint.BACKGROUND_PAINTERS[name](np.random.default_rng(0))
        b = paint.BACKGROUND_PAINTERS[name](np.random.default_rng(1))
        assert a.shape == (3, 64, 64) and np.clip(a, 0, 1).std() > 0, name
        assert not np.allclose(a, b), name  # each background has its own random variation
    g = np.linspace(-1.5, 1.5, 61, dtype=np.float32)
    v, u = np.meshgrid(g, g, indexing="ij")
    parts = (0.5,) * 6
    for cat in mw.CATEGORIES:
        sd, part = paint.shape_sdf(cat, u, v, 0.9, parts)
        assert sd.shape == u.shape and (sd < 0).mean() > 0.05, cat
        assert (sd[[0, 0, -1, -1], [0, -1, 0, -1]] > 0).all(), cat
        assert part.min() >= 0 and part.max() <= 2, cat
    for kind in mw.TEXTURES:
        t = paint.texture(kind, 2.0, 0.3, 1.0, 0.5, u, v, 0.05)
        assert t.min() >= 0 and t.max() <= 1 and t.std() > 0.1, kind
    for shape in mw.MARK_SHAPES:
        d = paint.mark_sdf(shape, u, v, 0.2, -0.1, 0.2)
        assert d[np.abs(g - (-0.1)).argmin(), np.abs(g - 0.2).argmin()] < 0 < d[0, 0], shape


def test_no_test_subject_is_a_train_subject_in_the_ranges_in_use():
    """Subject seeds keep 31 bits of their split's stream, so a test subject could equal a train
    subject by chance. Not in the ranges used: test 0..999 (MiniBench 0..39, validation 100..171,
    examples) against the largest training pool (40,000 sets, configs/mini.py:gpu) and more."""
    def seeds(split, n):
        return {mw.subject_seed(split, i): i for i in range(n)}

    train, test = seeds("train", 100_000), seeds("test", 1_000)  # (a pair within train is harmless)
    assert mw.subject_for("test", 7).seed == mw.subject_seed("test", 7)  # the seeds the subjects use
    assert not set(train) & set(test), sorted((test[s], train[s]) for s in set(train) & set(test))



def _sigint_ignored(_):
    import signal

    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_render_pool_workers_ignore_ctrl_c():
    """Ctrl-C reaches the pool's workers too: the trainer's first one only asks for a stop at a step
    boundary, so a worker killed mid-chunk would leave pool.map waiting forever. The workers of
    pool.spawn_pool (RenderPool's and the VAE trainer's) ignore SIGINT; the parent keeps its handler."""
    import signal

    from jedi_jax.data.pool import spawn_pool

    # Python's own handler first: a suite run as a background job ignores SIGINT, and spawned workers
    # would inherit that whatever spawn_pool does
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with spawn_pool(2) as pool:
            assert pool.map(_sigint_ignored, range(4)) == [True] * 4
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
