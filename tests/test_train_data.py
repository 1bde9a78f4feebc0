"""The training input pipeline (jedi_jax/train/loader.py): sharding, determinism, resume, set structure,
caption/reference dropout, and image/mask-consistent augmentation. Hermetic: an in-test source of the
record format and a tiny CLIP BPE tokenizer written to tmp."""
import json

import numpy as np
import pytest

from jedi_jax.train.loader import SetLoader, epoch_permutation, swap_words

T = 12  # token length of the toy tokenizer


class ToySource:
    """Records in the source format. Member m of set i is a constant-colour image (i % 256, 20*m + 5, 99),
    caption f"subject {i} photo {m}"; with_masks adds a random blob mask that is also written into a
    patterned image (R = 255*mask, G = x-gradient, B = y-gradient) to check augmentation consistency."""

    def __init__(self, sizes, hw=(24, 20), with_masks=False, suffix=""):
        self.sizes, self.hw, self.with_masks, self.suffix = list(sizes), hw, with_masks, suffix

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        n, (h, w) = self.sizes[i], self.hw
        rec = {"captions": [f"subject {i} photo {m}{self.suffix}" for m in range(n)], "subject": f"s{i}"}
        if not self.with_masks:
            img = np.empty((n, h, w, 3), np.uint8)
            img[..., 0] = i % 256
            img[..., 1] = (20 * np.arange(n) + 5)[:, None, None]
            img[..., 2] = 99
            rec["images"] = img
            return rec
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1)) * np.array([h, w])[:, None, None, None]
        masks = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.3 * min(h, w)) ** 2  # (n, h, w)
        img = np.empty((n, h, w, 3), np.uint8)
        img[..., 0] = masks * 255
        img[..., 1] = (xx * 255 // (w - 1))[None]
        img[..., 2] = (yy * 255 // (h - 1))[None]
        rec.update(images=img, masks=masks)
        return rec


def toy_tokenize(prompts):
    """Char-level stand-in: [BOS, chars..., EOS, pad...] -> int32 (len, T)."""
    out = np.zeros((len(prompts), T), np.int32)
    for r, p in enumerate(prompts):
        ids = [1] + [3 + ord(c) % 250 for c in p][: T - 2] + [2]
        out[r, : len(ids)] = ids
    return out


def make(source, **kw):
    base = dict(batch_size=8, set_size=4, image_size=16, seed=0, tokenize_fn=toy_tokenize)
    base.update(kw)
    return SetLoader(source, **base)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------------------------
def test_shards_disjoint_cover_epoch_and_match_single_process():
    src = ToySource([1 + i % 6 for i in range(37)])
    single = make(src)
    steps = single.steps_per_epoch
    assert steps == 37 // 8
    ref = take(single, steps)
    perm = epoch_permutation(37, 0, 0)
    assert sorted(perm.tolist()) == list(range(37))
    for pc in (2, 4):
        loaders = [make(src, process_index=p, process_count=pc) for p in range(pc)]
        seen = [[] for _ in range(pc)]
        for s in range(steps):
            parts = [next(ld) for ld in loaders]
            for p, b in enumerate(parts):
                assert b["images"].shape == (8 // pc, 4, 16, 16, 3)
                seen[p] += b["set_index"].tolist()
            # the global batch is the same whatever the process count
            assert_batches_equal(concat(parts), ref[s])
        flat = sum(seen, [])
        assert len(flat) == len(set(flat))  # disjoint shards
        assert sorted(flat) == sorted(perm[: steps * 8].tolist())  # together: the epoch
    # next epoch uses a different permutation
    e1 = np.concatenate([next(single)["set_index"] for _ in range(steps)])
    assert e1.tolist() == epoch_permutation(37, 0, 1)[: steps * 8].tolist()
    assert e1.tolist() != perm[: steps * 8].tolist()


def test_no_drop_remainder_pads_last_batch_and_covers_all():
    src = ToySource([3] * 13)
    loaders = [make(src, process_index=p, process_count=2, drop_remainder=False, num_epochs=1) for p in range(2)]
    batches = [list(ld) for ld in loaders]
    assert len(batches[0]) == len(batches[1]) == 2
    idx = np.concatenate([b["set_index"] for bs in batches for b in bs])
    valid = idx[idx >= 0]
    assert sorted(valid.tolist()) == list(range(13))
    for bs in batches:
        for b in bs:
            np.testing.assert_array_equal(b["set_mask"], b["set_index"] >= 0)
            assert not b["member_mask"][~b["set_mask"]].any()
            assert (b["images"][~b["set_mask"]] == 0).all()


def test_same_seed_same_batches_different_seed_differs():
    src = ToySource([2 + i % 5 for i in range(24)])
    a, b, c = take(make(src, seed=3), 4), take(make(src, seed=3), 4), take(make(src, seed=4), 4)
    for x, y in zip(a, b):
        assert_batches_equal(x, y)
    assert any(not np.array_equal(x["images"], y["images"]) for x, y in zip(a, c))
    assert any(not np.array_equal(x["set_index"], y["set_index"]) for x, y in zip(a, c))


def test_resume_exact_threads_and_process_count_change():
    src = ToySource([1 + i % 6 for i in range(20)])  # 2 steps per epoch: run crosses epoch boundaries
    run = make(src, seed=7)
    full = take(run, 7)
    # stateless access by step
    assert_batches_equal(run.batch_for_step(5), full[5])
    ld = make(src, seed=7)
    take(ld, 3)
    state = json.loads(json.dumps(ld.get_state()))
    assert state["epoch"] == 1 and state["position"] == 8
    assert state == run.state_for_step(3)
    resumed = make(src, seed=7)
    resumed.set_state(state)
    for got, want in zip(take(resumed, 4), full[3:]):
        assert_batches_equal(got, want)
    # threaded prefetch: same batches, and set_state mid-stream discards prefetched work
    with make(src, seed=7, num_workers=2, prefetch=3) as th:
        for got, want in zip(take(th, 4), full[:4]):
            assert_batches_equal(got, want)
        th.set_state(state)
        for got, want in zip(take(th, 4), full[3:]):
            assert_batches_equal(got, want)
    # a 1-process state resumes under 2 processes: halves of the same global batches
    halves = [make(src, seed=7, process_index=p, process_count=2) for p in range(2)]
    for h in halves:
        h.set_state(state)
    for want in full[3:6]:
        assert_batches_equal(concat([next(h) for h in halves]), want)
    with pytest.raises(ValueError):
        make(src, seed=8).set_state(state)


def test_set_structure_padding_refs_and_k_distribution():
    sizes = [1 + i % 7 for i in range(280)]  # 1..7 members, N = 4
    src = ToySource(sizes)
    ld = make(src, batch_size=40, tokenize_fn=None, caption_dropout=0.0, ref_dropout=0.0, num_epochs=1)
    ks = {n: [] for n in range(1, 8)}
    for b in ld:
        mm, rm, imgs, caps = b["member_mask"], b["ref_mask"], b["images"], b["captions"]
        assert mm.dtype == rm.dtype == bool and imgs.dtype == np.float32 and b["set_index"].dtype == np.int32
        assert not (rm & ~mm).any()  # refs are members
        assert ((mm & ~rm).sum(1) >= 1).all()  # at least one generated member
        for s, i in enumerate(b["set_index"]):
            n = sizes[i]
            valid = min(n, 4)
            np.testing.assert_array_equal(mm[s], np.arange(4) < valid)  # padding at the end
            assert (imgs[s, valid:] == 0).all() and (caps[s, valid:] == "").all()
            # constant-colour members survive crop/resize: identify them by their G value
            rgb = np.rint((imgs[s, :valid] + 1) * 127.5)
            assert (rgb[..., 0] == i % 256).all() and (rgb[..., 2] == 99).all()
            members = (rgb[:, 0, 0, 1] - 5) / 20
            assert len(set(members.tolist())) == valid and members.max() < n  # without replacement
            assert [c for c in caps[s, :valid]] == [f"subject {i} photo {int(m)}" for m in members]
            ks[n].append(int(rm[s].sum()))
    assert set(ks[1]) == {0}
    assert set(ks[2]) == {0, 1}
    for n in (4, 5, 6, 7):
        assert set(ks[n]) == {0, 1, 2, 3}  # covers 0..N-1
    big = sum((ks[n] for n in (4, 5, 6, 7)), [])
    assert np.allclose(np.bincount(big) / len(big), 0.25, atol=0.1)
    # max_ref and ref_dropout
    b = next(make(src, batch_size=40, max_ref=1, ref_dropout=0.0))
    assert b["ref_mask"].sum(1).max() == 1
    b = next(make(src, batch_size=40, ref_dropout=1.0))
    assert not b["ref_mask"].any()
    b = next(make(src, batch_size=40, ref_dropout=0.5))
    k0 = (b["ref_mask"].sum(1) == 0).mean()
    assert 0.4 < k0 < 0.9  # 0.5 + 0.5 * P(k = 0)


def test_caption_dropout_rate():
    src = ToySource([4] * 200)
    ld = make(src, batch_size=40, caption_dropout=0.3, num_epochs=1)
    empty_ids = toy_tokenize([""])[0]
    dropped, total = 0, 0
    for b in ld:
        ids, mm = b["input_ids"], b["member_mask"]
        assert ids.shape == (40, 4, T) and ids.dtype == np.int32
        is_empty = (ids == empty_ids).all(-1)
        dropped += int((is_empty & mm).sum())
        total += int(mm.sum())
    assert total == 800
    assert abs(dropped / total - 0.3) < 0.05
    none = make(src, batch_size=40, caption_dropout=0.0, tokenize_fn=None)
    assert (next(none)["captions"] != "").all()


def test_swap_words():
    pairs = [("left", "right")]
    assert swap_words("a cup at the left of a right-hand box", pairs) == "a cup at the right of a left-hand box"
    assert swap_words("Left leftover", pairs) == "Right leftover"
    assert swap_words("", pairs) == ""


def test_flips_and_crops_consistent_for_images_and_masks():
    src = ToySource([3] * 64, hw=(40, 32), with_masks=True, suffix=" at the left")
    ld = make(src, batch_size=64, image_size=16, hflip=0.5, crop_scale=(0.25, 1.0), crop_ratio=(0.75, 1.33),
              caption_dropout=0.0, tokenize_fn=None)
    b = next(ld)
    masks, imgs = b["masks"], b["images"]
    assert masks.dtype == np.float32 and masks.shape == (64, 4, 16, 16)
    # the mask went through exactly the same crop, filter and flip as image channel R (= 255 * mask)
    np.testing.assert_allclose(masks[:, :3], (imgs[:, :3, ..., 0] + 1) / 2, atol=1e-5)
    assert (masks[:, 3] == 0).all() and not b["member_mask"][:, 3].any()  # padding member
    assert masks.min() == 0 and masks.max() == 1 and (masks[:, :3].sum((2, 3)) > 0).mean() > 0.9
    # flips: G is an x-gradient; flipped members have it decreasing
    g = imgs[:, :3, :, :, 1]
    slope = np.sign(g[:, :, :, -1] - g[:, :, :, 0]).mean(-1)  # (64, 3)
    assert set(np.unique(slope).tolist()) == {-1.0, 1.0}
    assert 0.35 < (slope < 0).mean() < 0.65
    # flipped members' captions say "right" instead of "left"
    np.testing.assert_array_equal(np.char.endswith(b["captions"][:, :3], " at the right"), slope < 0)
    np.testing.assert_array_equal(np.char.endswith(b["captions"][:, :3], " at the left"), slope > 0)
    # flip_mode="set": one flip per set
    bs = next(make(src, batch_size=64, image_size=16, hflip=0.5, flip_mode="set", crop_scale=(0.25, 1.0)))
    gs = bs["images"][:, :3, :, :, 1]
    set_slope = np.sign(gs[:, :, :, -1] - gs[:, :, :, 0]).mean(-1)  # (64, 3)
    assert (set_slope == set_slope[:, :1]).all() and 0.3 < (set_slope[:, 0] < 0).mean() < 0.7
    # crops: the visible x-range varies between members
    span = (g[:, :, :, -1] - g[:, :, :, 0]).__abs__().mean(-1)
    assert span.std() > 0.05
    # no augmentation (scale 1, ratio = the image's w/h): exactly a plain full-image resize
    from PIL import Image
    plain = make(src, batch_size=64, image_size=16, hflip=0.0, crop_scale=(1, 1), crop_ratio=(0.8, 0.8))
    p = next(plain)
    rec = src[int(p["set_index"][0])]
    # member order is random: find each output member among the record's images
    want = [np.asarray(Image.fromarray(im).resize((16, 16), Image.Resampling.BILINEAR)) for im in rec["images"]]
    got = np.rint((p["images"][0, :3] + 1) * 127.5).astype(np.uint8)
    for g_ in got:
        assert any(np.array_equal(g_, w) for w in want)


def test_with_clip_tokenizer(tmp_path):
    from jedi_jax.models.tokenizer import load_tokenizer, tokenize, write_test_tokenizer

    write_test_tokenizer(tmp_path / "tok", ["subject", "photo"])
    tok = load_tokenizer(tmp_path / "tok")

    def tokenize_fn(prompts):
        return tokenize(tok, prompts, 8)

    src = ToySource([2, 4, 3, 5, 1, 6])
    b = next(make(src, batch_size=6, tokenize_fn=tokenize_fn, caption_dropout=0.5))
    ids = b["input_ids"]
    assert ids.shape == (6, 4, 8) and ids.dtype == np.int32
    empty = tokenize_fn([""])[0]
    cap = next(make(src, batch_size=6, tokenize_fn=None, caption_dropout=0.5))["captions"]
    for s in range(6):
        for m in range(4):
            np.testing.assert_array_equal(ids[s, m], tokenize_fn([str(cap[s, m])])[0])
            assert (cap[s, m] == "") == np.array_equal(ids[s, m], empty)
    assert ids[0, 0, 0] == tok.convert_tokens_to_ids("<|startoftext|>")
    assert tok.convert_tokens_to_ids("subject</w>") in ids


def test_latent_records_carry_their_subject_masks_with_the_members():
    """A latent record (the encoded pool) with masks at image resolution: with_masks=True puts each
    member's mask in the slot its latent went to (same member draw), padding slots get none, and a
    latent record without masks is an error when masks were asked for."""

    class LatentSource:
        def __len__(self):
            return 6

        def __getitem__(self, i):
            n = 2 + i % 3  # 2..4 members: some sets pad
            lat = np.zeros((n, 4, 4, 4), np.float32)
            lat[:, 0, 0, 0] = 100 * i + np.arange(n)  # member id readable from the latent
            masks = np.zeros((n, 16, 16), bool)
            for m in range(n):
                masks[m, m, :] = True  # member m's mask: row m
            return {"latents": lat, "masks": masks, "captions": [f"c{m}" for m in range(n)], "subject": f"s{i}"}

    loader = make(LatentSource(), batch_size=6, with_masks=True, hflip=0.0)
    batch = next(iter(loader))
    assert batch["masks"].shape == (6, 4, 16, 16) and batch["latents"].shape == (6, 4, 4, 4, 4)
    for b in range(6):
        for slot in range(4):
            if not batch["member_mask"][b, slot]:
                assert batch["masks"][b, slot].max() == 0
                continue
            m = int(round(batch["latents"][b, slot, 0, 0, 0])) % 100  # which member sits in this slot
            rows = np.flatnonzero(batch["masks"][b, slot].max(axis=1))
            assert rows.tolist() == [m] and batch["masks"][b, slot, m].min() == 1.0
    with pytest.raises(ValueError, match="needs 'masks'"):
        plain = type("P", (), {"__len__": lambda s: 6, "__getitem__": lambda s, i: {
            k: v for k, v in LatentSource()[i].items() if k != "masks"}})()
        next(iter(make(plain, batch_size=6, with_masks=True, hflip=0.0)))


class _LatentSets:
    """n records of 3 members with (3, 2, 2, 4) latents whose value is the record index."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"latents": np.full((3, 2, 2, 4), i, np.float32), "captions": ["c"] * 3, "subject": f"s{i}"}


def test_a_process_of_padding_only_emits_the_same_keys_and_shapes():
    """drop_remainder=False, 5 latent sets, batch 4 over 2 processes: the last batch holds one set, so
    process 1's half is all padding. It must still emit 'latents' of the same shape as process 0
    (a pixel batch there would break the global batch), with every mask False."""
    kw = dict(batch_size=4, drop_remainder=False, process_count=2, hflip=0.0, shuffle=False)
    last = [take(iter(make(_LatentSets(5), process_index=p, **kw)), 2)[1] for p in (0, 1)]
    assert last[0].keys() == last[1].keys() and "latents" in last[1] and "images" not in last[1]
    assert last[1]["latents"].shape == last[0]["latents"].shape == (2, 4, 2, 2, 4)
    assert not last[1]["set_mask"].any() and not last[1]["member_mask"].any()
    assert last[0]["set_mask"].tolist() == [True, False]


def test_a_failed_batch_is_rebuilt_on_the_next_call_with_worker_threads():
    """A record that fails once (a flaky read) makes next() raise; the loader has not moved, so the
    next call rebuilds that batch and the run continues exactly as one without the failure."""

    class FlakyOnce(ToySource):
        failed = False

        def __getitem__(self, i):
            if i == 3 and not FlakyOnce.failed:
                FlakyOnce.failed = True
                raise OSError("transient read error")
            return super().__getitem__(i)

    want = take(make(ToySource([3] * 16), shuffle=False), 2)
    flaky = make(FlakyOnce([3] * 16), shuffle=False, num_workers=2)
    with pytest.raises(OSError, match="transient"):
        next(flaky)
    got = take(flaky, 2)
    flaky.close()
    for a, b in zip(got, want):
        assert_batches_equal(a, b)


def test_native_decoder_gives_colours_for_palette_and_alpha_pngs():
    """A dataset builder may store palette or RGBA PNGs: the native reader decodes them to RGB colours
    (as TFDS's 3-channel image feature does), not to palette indices, and an 'L' PNG mask to 0/1."""
    import io

    from PIL import Image

    from jedi_jax.data.set_source import decode_record, serialize_example

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    red_blue = np.zeros((4, 4, 3), np.uint8)
    red_blue[:, :2], red_blue[:, 2:] = (255, 0, 0), (0, 0, 255)
    palette = Image.fromarray(red_blue).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    rgba = Image.fromarray(np.dstack([red_blue, np.full((4, 4), 255, np.uint8)]), "RGBA")
    mask = Image.fromarray(np.eye(4, dtype=np.uint8) * 255).convert("P")
    rec = decode_record(serialize_example({"images": [png(palette), png(rgba)], "captions": [b"a", b"b"],
                                           "subject": [b"s"], "masks": [png(mask), png(mask)]}))
    assert rec["images"].shape == (2, 4, 4, 3)
    for image in rec["images"]:
        np.testing.assert_array_equal(image, red_blue)
    np.testing.assert_array_equal(rec["masks"][0], np.eye(4, dtype=bool))


def test_int64_lists_decode_signed_packed_or_not():
    """TensorFlow writes Int64List packed, other writers may not: both decode -5 as -5."""
    from jedi_jax.data.set_source import _len_field, _varint, parse_example, serialize_example

    assert parse_example(serialize_example({"n": [-5, 7]}))["n"] == [-5, 7]  # packed
    unpacked = b"".join(_varint(1 << 3) + _varint(v & ((1 << 64) - 1)) for v in (-5, 7))  # field 1, wire 0
    feature = _len_field(3, unpacked)
    example = _len_field(1, _len_field(1, _len_field(1, b"n") + _len_field(2, feature)))
    assert parse_example(example)["n"] == [-5, 7]


def test_closing_the_loader_closes_its_source():
    class Closable(ToySource):
        closed = 0

        def close(self):
            Closable.closed += 1

    loader = make(Closable([3] * 8), num_workers=1)
    next(loader)
    loader.close()
    assert Closable.closed == 1


def test_loader_refuses_bad_probabilities_seeds_states_and_flipping_the_mini_world():
    src = ToySource([3] * 16)
    for kw, message in ((dict(caption_dropout=1.5), "caption_dropout=1.5"), (dict(ref_dropout=-1.0), "ref_dropout=-1.0"),
                        (dict(hflip=float("nan")), "hflip=nan"), (dict(seed=-1), "seed=-1")):
        with pytest.raises(ValueError, match=message):
            make(src, **kw)
    with pytest.raises(ValueError, match="epoch -1"):
        make(src).set_state({"epoch": -1, "position": 0})
    # A mirrored train render of (beach, left) is the held-out (beach, right) pair: the mini world's
    # sources say they must not be flipped, and the loader holds them to it.
    from jedi_jax.data.mini_world import HELDOUT_COMBOS
    from jedi_jax.data.set_source import MiniWorldSource

    world = MiniWorldSource("train", num_sets=16, set_size=3)
    # the reason: a held-out pair's mirror is a pair training renders (left <-> right), so a flipped
    # train render would show a held-out pair
    mirror = {"left": "right", "right": "left"}
    assert any((b, mirror[p]) not in HELDOUT_COMBOS for b, p in HELDOUT_COMBOS if p in mirror)
    with pytest.raises(ValueError, match="MiniWorldSource must not be mirrored"):
        make(world, hflip=0.5)
    with pytest.raises(ValueError, match="MiniWorldSource must not be cropped"):  # a crop moves the subject too
        make(world, hflip=0.0, crop_scale=(0.5, 1.0))
    make(world, hflip=0.0)
    make(src, hflip=0.5)  # a source that says nothing may be flipped
