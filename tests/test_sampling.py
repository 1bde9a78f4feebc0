"""Joint sampler and pipeline invariants on a tiny random JeDi (JeDi Sec. 3.3-3.4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jedi_jax.models.jedi_inputs import unet_input
from jedi_jax.sampling import guidance
from jedi_jax.sampling.images import from_model_range, to_model_range
from jedi_jax.sampling.joint import guided_output

PROMPT = "a photo of the dog on the beach"


def _refs(seed, n=2, size=32):
    rng = np.random.default_rng(seed)
    return [(rng.random((size + 8, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def test_unet_input_zeroes_the_reference_slot_of_unknown_members_whatever_it_holds():
    """[x_t | known | clean refs, zeros where unknown] (JeDi Sec. 3.3): a NaN left in an unknown
    member's reference slot must not reach its input (0 * NaN is NaN; the member is being generated)."""
    rng = np.random.default_rng(0)
    noisy = jnp.asarray(rng.standard_normal((1, 3, 2, 2, 4)), jnp.float32)
    refs = jnp.asarray(rng.standard_normal((1, 3, 2, 2, 4)), jnp.float32).at[0, 1].set(jnp.nan)
    ref_mask = jnp.asarray([[True, False, False]])
    x = np.asarray(unet_input(noisy, refs, ref_mask))  # (1, 3, 2, 2, 9)
    assert x.shape == (1, 3, 2, 2, 9) and np.isfinite(x).all()
    np.testing.assert_array_equal(x[0, 0, ..., 5:], np.asarray(refs)[0, 0])  # known: its clean latent
    assert (x[0, 1:, ..., 4:] == 0).all() and (x[0, 0, ..., 4] == 1).all()  # unknown: zeros, mask 0


def test_same_seed_same_images_different_seed_differs(tiny_pipeline):
    run = lambda seed: tiny_pipeline([PROMPT], _refs(0, 1), num_inference_steps=3, seed=seed).set_images
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0].astype(int) - c[0].astype(int)).mean() > 1.0


def test_seeds_use_all_64_bits_and_keep_their_32_bit_images(tiny_pipeline, tmp_path):
    """jax.random.key keeps a seed's low 32 bits: 2**32 + 1 would silently give seed 1's image. The
    high word is folded in; seeds below 2**32 give the keys (and images) they always gave."""
    from jedi_jax.pipeline import seed_key

    for seed in (0, 1, 2**32 - 1):
        np.testing.assert_array_equal(jax.random.key_data(seed_key(seed)), jax.random.key_data(jax.random.key(seed)))
    run = lambda seed: tiny_pipeline([PROMPT], _refs(0, 1), num_inference_steps=2, seed=seed).set_images
    assert np.abs(run(2**32 + 1)[0].astype(int) - run(1)[0].astype(int)).mean() > 1.0
    np.testing.assert_array_equal(run(2**63 + 5), run(2**63 + 5))
    # one path is one reference (not one per character), like one prompt string is one prompt
    from PIL import Image

    Image.fromarray(_refs(0, 1)[0]).save(tmp_path / "r.png")
    out = tiny_pipeline(PROMPT, str(tmp_path / "r.png"), num_inference_steps=1)
    assert out.settings["num_references"] == 1 and len(out.references) == 1


def test_overlong_prompts_warn_and_are_recorded(tiny_pipeline):
    long = " ".join([PROMPT] * 20)
    with pytest.warns(UserWarning, match="longer than the text encoder's"):
        out = tiny_pipeline(long, num_inference_steps=1)
    assert out.settings["truncated_prompts"] == [long]
    assert tiny_pipeline(PROMPT, num_inference_steps=1).settings["truncated_prompts"] == []


def test_words_outside_a_closed_vocabulary_warn_once_each(tiny_pipeline):
    """The tiny model's tokenizer holds a few words (a closed vocabulary, like JeDi-mini's 240): a
    prompt word outside it is named once, in order; the known words of PROMPT warn nothing."""
    import warnings

    with pytest.warns(UserWarning, match=r"vocabulary .*: zebra, with, sunglasses$"):
        tiny_pipeline([PROMPT, "a zebra on the beach AND a Zebra with sunglasses"], num_inference_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (a first compile may raise a library DeprecationWarning)
        tiny_pipeline(PROMPT, num_inference_steps=1)


def test_an_open_vocabulary_names_no_unseen_words(tiny_pipeline, monkeypatch):
    """A real CLIP vocabulary (49,408 tokens) splits rare words legitimately: no warning there."""
    from jedi_jax import pipeline as pipeline_lib

    assert tiny_pipeline._unseen_words(["a zebra"]) == ["zebra"]
    monkeypatch.setattr(pipeline_lib, "CLOSED_VOCABULARY_SIZE", len(tiny_pipeline.model.tokenizer))
    assert tiny_pipeline._unseen_words(["a zebra"]) == []


def test_the_mini_world_captions_are_all_known_words():
    """Every word a mini-world caption or MiniBench prompt can hold is one token of the packaged
    tokenizer: the unseen-word warning never fires on the world's own wording."""
    from jedi_jax.data import mini_world
    from jedi_jax.data.tokenizer_files import load_tokenizer

    tok = load_tokenizer()
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in mini_world.vocabulary())


def _branch_setup(pipe, seed=0):
    unet = pipe.model.unet
    key = jax.random.key(seed)
    b, n, h, c = 1, 3, 8, 4
    x_t = jax.random.normal(jax.random.fold_in(key, 0), (b, n, h, h, c))
    refs = jax.random.normal(jax.random.fold_in(key, 1), (b, n, h, h, c))
    d = pipe.model.text_encoder.config.hidden_size
    ctx = jax.random.normal(jax.random.fold_in(key, 2), (b, n, 5, d))
    empty = jax.random.normal(jax.random.fold_in(key, 3), (b, n, 5, d))
    layout = guidance.SetLayout(member_mask=jnp.array([[True, True, False]]), ref_mask=jnp.array([[False, True, False]]))
    fn = lambda p, x, t, cx, mm: unet.functional.bind(p)(x, t, cx, mm)
    return unet, fn, x_t, refs, ctx, empty, layout


def test_unit_scales_equal_fully_conditioned_branch(tiny_pipeline):
    unet, fn, x_t, refs, ctx, empty, layout = _branch_setup(tiny_pipeline)
    t = jnp.int32(500)
    guided = guided_output(fn, unet.params, x_t, t, refs, layout, ctx, empty, 1.0, 1.0)
    direct = fn(unet.params, unet_input(x_t, refs, layout.ref_mask), jnp.full((1,), t), ctx, layout.member_mask)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(direct), atol=2e-5)
    # And the scales matter: (2, 3) differs from (1, 1).
    other = guided_output(fn, unet.params, x_t, t, refs, layout, ctx, empty, 2.0, 3.0)
    assert float(jnp.abs(other - guided)[0, 0].max()) > 1e-3


def test_zero_scales_ignore_references_and_prompts(tiny_pipeline):
    unet, fn, x_t, refs, ctx, empty, layout = _branch_setup(tiny_pipeline)
    t = jnp.int32(300)
    a = guided_output(fn, unet.params, x_t, t, refs, layout, ctx, empty, 0.0, 0.0)
    b = guided_output(fn, unet.params, x_t, t, refs * -3.0 + 1.0, layout, ctx * 2.0 - 1.0, empty, 0.0, 0.0)
    np.testing.assert_allclose(np.asarray(a[:, 0]), np.asarray(b[:, 0]), atol=1e-5)  # the target member
    # Through the whole pipeline: other reference pixels and another prompt give the same target image.
    run = lambda refs, prompt: tiny_pipeline([prompt], refs, num_inference_steps=3, seed=0, guidance_scale=0.0,
                                             image_guidance_scale=0.0).set_images[0]
    x = run(_refs(0), PROMPT)
    y = run(_refs(7), "a red ball in the snow")
    assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    z = tiny_pipeline([PROMPT], _refs(7), num_inference_steps=3, seed=0).set_images[0]  # default scales
    assert np.abs(x.astype(int) - z.astype(int)).max() > 1


def test_replacement_mode_returns_the_references(tiny_pipeline):
    refs = _refs(3)
    out = tiny_pipeline([PROMPT], refs, num_inference_steps=2, seed=0, replace_known=True)
    vae = tiny_pipeline.model.vae
    module = vae.functional.bind(vae.params)
    x = jnp.asarray(np.stack([to_model_range(np.asarray(r)) for r in out.references]))
    mean, _ = module.encode(x)
    expected = from_model_range(module.decode(mean))  # encode -> decode of the references
    got = out.set_images[1:3]  # layout: target, reference 1, reference 2
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_changing_k_reuses_one_compiled_program(tiny_model_dir):
    from jedi_jax.pipeline import JeDiPipeline

    pipe = JeDiPipeline.from_pretrained(tiny_model_dir, max_references=3)
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        pipe([PROMPT], _refs(0, 1), num_inference_steps=2)
        after_first = len(compiles)
        for k in (2, 3, 0):
            pipe([PROMPT], _refs(k, k), num_inference_steps=2, seed=k)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert after_first >= 1
    assert len(compiles) == after_first, f"k=2,3,0 compiled {len(compiles) - after_first} new programs"
    assert pipe.compiled_programs() == 1


def test_bad_pipeline_input(tiny_pipeline):
    from jedi_jax.pipeline import PipelineInputError

    with pytest.raises(PipelineInputError, match="at most 2"):
        tiny_pipeline([PROMPT], _refs(0, 3))
    with pytest.raises(PipelineInputError, match="steps"):
        tiny_pipeline([PROMPT], num_inference_steps=0)
    with pytest.raises(PipelineInputError, match="no prompt"):
        tiny_pipeline([])
    with pytest.raises(PipelineInputError, match="dpmpp_2m"):
        tiny_pipeline([PROMPT], sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(PipelineInputError, match="steps=1001"):  # more steps than the schedule has
        tiny_pipeline([PROMPT], num_inference_steps=1001)
    with pytest.raises(PipelineInputError, match=r"must be in \[0, 2\*\*64\)"):
        tiny_pipeline([PROMPT], seed=2**64)
    with pytest.raises(PipelineInputError, match=r"must be in \[0, 2\*\*64\)"):
        tiny_pipeline([PROMPT], seed=-1)
    with pytest.raises(PipelineInputError, match="finite"):
        tiny_pipeline([PROMPT], guidance_scale=float("nan"))
    for eta in (float("inf"), float("nan"), 1.5):  # above 1 the DDIM variance exceeds 1 - abar: NaN images
        with pytest.raises(PipelineInputError, match=r"eta must be in \[0, 1\]"):
            tiny_pipeline([PROMPT], eta=eta)
    with pytest.raises(PipelineInputError, match="two fractions"):
        tiny_pipeline([PROMPT], image_guidance_interval=(0.1, 0.5, 0.9))


def test_unfit_model_folders_are_one_error_naming_the_mismatch(tiny_pipeline):
    """A folder whose parts do not fit JeDi's set inpainting (a plain 4-channel SD UNet, a width
    mismatch, an SDXL UNet, a text layer the encoder does not have) fails at construction with one
    PipelineInputError, not deep inside the UNet's trace at the first call."""
    import dataclasses

    from jedi_jax.pipeline import JeDiPipeline, PipelineInputError

    model = tiny_pipeline.model

    def changed(name, **fields):
        component = model.components[name]
        new = dataclasses.replace(component, config=dataclasses.replace(component.config, **fields))
        return dataclasses.replace(model, components={**model.components, name: new})

    c = model.vae.config.latent_channels
    cases = [(changed("unet", in_channels=c),
              rf"unet.in_channels={c} must be 2\*latent_channels\+1={2 * c + 1} .*--unet-in-channels {2 * c + 1}"),
             (changed("unet", out_channels=2 * c), f"unet.out_channels={2 * c} must equal vae.latent_channels={c}"),
             (changed("text_encoder", hidden_size=48, num_attention_heads=2),
              r"unet.cross_attention_dim=\(32, 32\) must equal text_encoder.hidden_size=48"),
             (changed("unet", addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8),
              "SDXL-style UNet")]
    for bad, message in cases:
        with pytest.raises(PipelineInputError, match=message):
            JeDiPipeline(bad)
    layers = model.text_encoder.config.num_hidden_layers
    for layer in (layers + 1, -(layers + 2), "penultimat", True):
        with pytest.raises(PipelineInputError, match=f"text_layer={layer!r}"):
            JeDiPipeline(model, text_layer=layer)
    JeDiPipeline(model, text_layer=-(layers + 1))  # hidden_states[0], the embeddings: in range
    # what the compiled programs read at trace time cannot change under them
    for name in ("text_layer", "coupled_attention", "schedule"):
        with pytest.raises(AttributeError):
            setattr(tiny_pipeline, name, getattr(tiny_pipeline, name))


def test_one_reference_prompt_or_mask_given_alone_is_one_item(tiny_pipeline, tmp_path):
    """A single string is one reference prompt (list() would make it one caption per character)."""
    from PIL import Image

    from jedi_jax.pipeline import PipelineInputError

    out = tiny_pipeline([PROMPT], _refs(0, 1)[0], reference_prompts="a red toy", num_inference_steps=2)
    assert out.settings["reference_prompts"] == ["a red toy"]
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((40, 32), 255, np.uint8)).save(mask)  # the references' shape
    out = tiny_pipeline([PROMPT], _refs(0, 1), reference_masks=str(mask), num_inference_steps=2)
    assert out.settings["reference_masks"] == [str(mask)]
    stack = np.full((2, 40, 32), 255, np.uint8)  # (k, H, W): k masks, one per reference
    out = tiny_pipeline([PROMPT], _refs(0, 2), reference_masks=stack, num_inference_steps=2)
    assert out.settings["reference_masks"] == ["array", "array"]
    with pytest.raises(PipelineInputError, match="1 reference prompts for 2 references"):
        tiny_pipeline([PROMPT], _refs(0, 2), reference_prompts="ab")  # not the captions "a" and "b"


def test_model_folder_recommends_guidance_scales(tiny_model_dir, tmp_path):
    """jedi_model.json "sampling" fills the scales a caller leaves out; explicit values win; the
    recorded settings say what ran; a bad recommendation is a strict load error naming it."""
    import json
    import shutil

    from jedi_jax.convert.torch_naming import ConversionError
    from jedi_jax.loading import load_model
    from jedi_jax.pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, JeDiPipeline

    folder = tmp_path / "rec"
    shutil.copytree(tiny_model_dir, folder)
    index_path = folder / "jedi_model.json"
    index = json.loads(index_path.read_text())
    assert JeDiPipeline(load_model(folder)).guidance_scales() == (DEFAULT_GUIDANCE_SCALE,
                                                                   DEFAULT_IMAGE_GUIDANCE_SCALE)
    index_path.write_text(json.dumps(dict(index, sampling={"image_guidance_scale": 4.5, "note": "why"})))
    pipe = JeDiPipeline(load_model(folder), max_references=2)
    assert pipe.guidance_scales() == (DEFAULT_GUIDANCE_SCALE, 4.5)
    assert pipe.guidance_scales(1.0, 0.0) == (1.0, 0.0)
    out = pipe([PROMPT], _refs(0, 1), num_inference_steps=2)
    assert out.settings["image_guidance_scale"] == 4.5 and out.settings["guidance_scale"] == DEFAULT_GUIDANCE_SCALE
    # the text layer the UNet was trained on travels with the folder; an explicit one wins
    index_path.write_text(json.dumps(dict(index, sampling={"text_layer": "embeddings"})))
    assert JeDiPipeline(load_model(folder)).text_layer == "embeddings"
    assert JeDiPipeline(load_model(folder), text_layer="last").text_layer == "last"
    index_path.write_text(json.dumps(dict(index, sampling={"text_layer": "tokens"})))  # the bag of words
    tokens = JeDiPipeline(load_model(folder), max_references=2)
    assert tokens.text_layer == "tokens"
    same = dict(num_inference_steps=2, guidance_scale=3.0, image_guidance_scale=2.0)
    a = tokens([PROMPT], _refs(0, 1), **same).set_images.astype(int)
    b = JeDiPipeline(tokens.model, max_references=2, text_layer="embeddings")([PROMPT], _refs(0, 1), **same)
    assert np.abs(a - b.set_images.astype(int)).max() >= 1  # the same folder, another context for the UNet
    for bad, match in (({"image_scale": 2.0}, "unknown sampling setting"), ({"guidance_scale": -1}, "numbers >= 0"),
                       ({"guidance_scale": "3"}, "numbers >= 0"), ({"text_layer": "first"}, "text_layer must be"),
                       ({"text_layer": True}, "text_layer must be")):
        index_path.write_text(json.dumps(dict(index, sampling=bad)))
        with pytest.raises(ConversionError, match=match):
            load_model(folder)


def test_composed_prompt_guidance_is_the_sum_of_its_parts(tiny_pipeline):
    """Composable guidance (guidance.py): one part of weight 1 (plus a zero-weight padding part) is the
    plain formula; two parts give base + sT (d_A + d_B), i.e. g(A AND B) = g(A) + g(B) - g(sT=0),
    with and without image guidance; a target-only change (references keep their captions)."""
    unet, fn, x_t, refs, ctx, empty, layout = _branch_setup(tiny_pipeline)
    t = jnp.int32(400)
    other = ctx.at[:, 0].set(ctx[:, 0] * 0.5 + 0.3)  # another prompt for the target (member 0) only
    parts = jnp.stack([ctx, other])  # (2, B, N, T, D)
    for image_guidance in (True, False):
        g = lambda c, st, **kw: guided_output(fn, unet.params, x_t, t, refs, layout, c, empty, 2.0, st,  # noqa: E731
                                              image_guidance, **kw)
        plain = g(ctx, 3.0)
        padded = g(ctx, 3.0, part_contexts=parts, part_weights=jnp.array([[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]]]))
        np.testing.assert_allclose(np.asarray(padded), np.asarray(plain), atol=2e-5)
        both = g(ctx, 3.0, part_contexts=parts, part_weights=jnp.ones((2, 1, 3)))
        summed = plain + g(other, 3.0) - g(ctx, 0.0)
        np.testing.assert_allclose(np.asarray(both[:, 0]), np.asarray(summed[:, 0]), atol=5e-5)  # the target
        assert float(jnp.abs(both - plain)[0, 0].max()) > 1e-3
    assert guidance.num_branches(True, 2) == 4 and guidance.num_branches(False, 3) == 4
    with pytest.raises(ValueError, match="both part_contexts and part_weights"):
        guided_output(fn, unet.params, x_t, t, refs, layout, ctx, empty, 2.0, 3.0, part_contexts=parts)


def test_pipeline_composed_prompt(tiny_pipeline):
    """"X AND X" at sT asks for X twice: the same as "X" at 2 sT. An empty part is refused."""
    from jedi_jax.pipeline import PipelineInputError

    run = lambda prompt, st: tiny_pipeline([prompt], _refs(0, 1), num_inference_steps=3, seed=0,  # noqa: E731
                                           guidance_scale=st, image_guidance_scale=2.0)
    twice = run(f"{PROMPT} AND {PROMPT}", 1.5)
    assert twice.settings["prompt_parts"] == 2
    a, b = twice.set_images[0].astype(int), run(PROMPT, 3.0).set_images[0].astype(int)
    assert np.abs(a - b).max() <= 2
    c = run(f"{PROMPT} AND a red ball in the snow", 1.5).set_images[0].astype(int)
    assert np.abs(a - c).max() > 2
    for bad in (f"{PROMPT} AND  ", f"AND {PROMPT}"):
        with pytest.raises(PipelineInputError, match="empty part"):
            run(bad, 1.5)


def test_pipeline_weighted_composed_prompt(tiny_pipeline):
    """Part weights (":w"): "X :2 AND X :-1" guides by 2 d_X - d_X = d_X, the plain prompt's guidance;
    "X :3 AND X :-1" is X at twice the scale. split_prompt parses weights only in composed prompts and
    refuses a zero weight in one line."""
    from jedi_jax.pipeline import PipelineInputError, split_prompt

    run = lambda prompt, st: tiny_pipeline([prompt], _refs(0, 1), num_inference_steps=3, seed=0,  # noqa: E731
                                           guidance_scale=st, image_guidance_scale=2.0).set_images[0].astype(int)
    plain, doubled = run(PROMPT, 1.5), run(PROMPT, 3.0)
    assert np.abs(run(f"{PROMPT} :2 AND {PROMPT} :-1", 1.5) - plain).max() <= 2
    assert np.abs(run(f"{PROMPT} :3 AND {PROMPT} :-1", 1.5) - doubled).max() <= 2
    assert np.abs(plain - doubled).max() > 2
    assert split_prompt("a ball :2 AND a box :-0.5") == [("a ball", 2.0), ("a box", -0.5)]
    assert split_prompt("a ball :2") == [("a ball :2", 1.0)]  # a plain prompt is taken verbatim
    with pytest.raises(PipelineInputError, match="weight 0"):
        split_prompt("a ball :0 AND a box")


def test_image_guidance_interval(tiny_pipeline):
    from jedi_jax.pipeline import PipelineInputError, per_step_scales

    np.testing.assert_array_equal(per_step_scales(4.0, 10, (0.3, 1.0)), [1, 1, 1] + [4] * 7)
    np.testing.assert_array_equal(per_step_scales(4.0, 4, (0.0, 0.5)), [4, 4, 1, 1])
    np.testing.assert_array_equal(per_step_scales(2.5, 3), [2.5] * 3)
    for bad in [(0.5, 0.5), (-0.1, 1.0), (0.2, 1.5)]:
        with pytest.raises(PipelineInputError, match="image_guidance_interval"):
            per_step_scales(4.0, 10, bad)
    run = lambda sI, interval=None: tiny_pipeline([PROMPT], _refs(3, 2), num_inference_steps=3, seed=0,
                                                  image_guidance_scale=sI,
                                                  image_guidance_interval=interval).set_images[0].astype(int)
    full, one = run(4.0), run(1.0)
    # The whole trajectory is the plain scale; an interval that holds no step leaves every step at 1.
    np.testing.assert_array_equal(run(4.0, (0.0, 1.0)), full)
    np.testing.assert_array_equal(run(4.0, (0.9, 1.0)), one)  # steps sit at 0, 1/3, 2/3
    # sI on the first two steps only: unlike either constant schedule (the equalities above are exact,
    # so any differing pixel is the schedule's doing; the random tiny UNet moves only a few).
    part = run(4.0, (0.0, 0.5))
    assert np.abs(part - full).max() >= 1 and np.abs(part - one).max() >= 1
    assert np.abs(full - one).max() >= 1
    with pytest.raises(PipelineInputError, match="image_guidance_interval"):
        run(4.0, (0.7, 0.2))


def test_reference_start_runs_the_first_steps_text_only(tiny_pipeline):
    """reference_start r: the steps before r see no references and are exactly the text-only sampler's
    (pipeline.reference_steps, joint.sample_set's references_on); r = 0 is the plain program."""
    from jedi_jax.pipeline import PipelineInputError, reference_steps

    np.testing.assert_array_equal(reference_steps(10, 0.3), [False] * 3 + [True] * 7)
    assert reference_steps(4, 0.0) is None
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(PipelineInputError, match="reference_start"):
            reference_steps(4, bad)
    refs = _refs(7, 2)
    run = lambda refs, start=0.0: tiny_pipeline([PROMPT], refs, num_inference_steps=3, seed=0, guidance_scale=2.0,
                                                image_guidance_scale=3.0, reference_start=start).set_images[0].astype(int)
    full, text_only = run(refs), run([])
    assert np.abs(full - text_only).max() >= 1  # the references matter on the plain program
    np.testing.assert_array_equal(run(refs, 0.0), full)
    # Steps sit at 0, 1/3, 2/3: from 0.9 no step sees the references, so the target is the text-only
    # one whatever the references hold.
    late = run(refs, 0.9)
    assert np.abs(late - text_only).max() <= 1, np.abs(late - text_only).max()
    np.testing.assert_array_equal(run(_refs(8, 2), 0.9), late)
    # From 0.5 only the last step sees them: unlike both, and the references' pixels matter again.
    mid = run(refs, 0.5)
    assert np.abs(mid - full).max() >= 1 and np.abs(mid - text_only).max() >= 1
    assert np.abs(run(_refs(8, 2), 0.5) - mid).max() >= 1
    assert tiny_pipeline([PROMPT], refs, num_inference_steps=3, reference_start=0.5).settings["reference_start"] == 0.5


def test_references_on_must_match_the_steps(tiny_pipeline):
    from jedi_jax.sampling.joint import JointSamplerConfig, sample_set

    unet, fn, x_t, refs, ctx, empty, layout = _branch_setup(tiny_pipeline)
    timesteps = jnp.array([900, 500, 100], jnp.int32)
    with pytest.raises(ValueError, match="one flag per step"):
        sample_set(fn, unet.params, tiny_pipeline.schedule, timesteps, x_t, refs, layout, ctx, empty, 2.0, 2.0,
                   jax.random.key(0), config=JointSamplerConfig(), references_on=jnp.ones((2,), bool))


def test_text_first_guidance_order(tiny_pipeline):
    """order="text_first" (guidance.py): out = e(noI,noT) + sT (e(noI,T) - e(noI,noT)) + sI (e(I,T) - e(noI,T)),
    checked against the three branches run one by one; exactly e(I,T) at sI = sT = 1; at sI = 0 the
    references have no say at all (the image term alone carries them). The two orders differ by
    (sI - sT) (e(I,T) - e(noI,T) - e(I,noT) + e(noI,noT)): equal at sI = sT, not otherwise."""
    unet, fn, x_t, refs, ctx, empty, layout = _branch_setup(tiny_pipeline)
    t = jnp.int32(450)
    g = lambda r, si, st, order="text_first": guided_output(fn, unet.params, x_t, t, r, layout, ctx, empty,  # noqa: E731
                                                          si, st, order=order)
    ts = jnp.full((1,), t)
    no_refs = jnp.zeros_like(layout.ref_mask)
    is_target = layout.target_mask[:, :, None, None]
    ctx_no_text = jnp.where(is_target, empty, ctx)
    no_i_no_t = fn(unet.params, unet_input(x_t, refs, no_refs), ts, ctx_no_text, layout.target_mask)
    no_i_text = fn(unet.params, unet_input(x_t, refs, no_refs), ts, ctx, layout.target_mask)
    full = fn(unet.params, unet_input(x_t, refs, layout.ref_mask), ts, ctx, layout.member_mask)
    expected = no_i_no_t + 3.0 * (no_i_text - no_i_no_t) + 4.0 * (full - no_i_text)
    np.testing.assert_allclose(np.asarray(g(refs, 4.0, 3.0)[:, 0]), np.asarray(expected[:, 0]), atol=5e-5)
    np.testing.assert_allclose(np.asarray(g(refs, 1.0, 1.0)[:, 0]), np.asarray(full[:, 0]), atol=2e-5)
    # sI = 0: other reference latents give the same target; sI = 4 they do not
    other_refs = refs * -3.0 + 1.0
    np.testing.assert_allclose(np.asarray(g(refs, 0.0, 3.0)[:, 0]), np.asarray(g(other_refs, 0.0, 3.0)[:, 0]),
                               atol=1e-5)
    assert float(jnp.abs(g(refs, 4.0, 3.0) - g(other_refs, 4.0, 3.0))[0, 0].max()) > 1e-3
    assert float(jnp.abs(g(refs, 4.0, 3.0) - g(refs, 4.0, 3.0, "image_first"))[0, 0].max()) > 1e-3
    np.testing.assert_allclose(np.asarray(g(refs, 3.0, 3.0)[:, 0]), np.asarray(g(refs, 3.0, 3.0, "image_first")[:, 0]),
                               atol=5e-5)
    with pytest.raises(ValueError, match="unknown guidance order"):
        g(refs, 4.0, 3.0, "both")
    parts = jnp.stack([ctx, ctx])
    with pytest.raises(ValueError, match="composed prompts"):
        guided_output(fn, unet.params, x_t, t, refs, layout, ctx, empty, 2.0, 3.0, part_contexts=parts,
                      part_weights=jnp.ones((2, 1, 3)), order="text_first")


def test_pipeline_guidance_order(tiny_model_dir, tmp_path):
    """The pipeline takes guidance_order, else the model folder's ("sampling": "guidance_order"), else
    image_first; the settings record what ran; composed prompts, an unknown order and a bad folder
    value are refused with an error naming the problem."""
    import json
    import shutil

    from jedi_jax.convert.torch_naming import ConversionError
    from jedi_jax.loading import load_model
    from jedi_jax.pipeline import JeDiPipeline, PipelineInputError

    folder = tmp_path / "order"
    shutil.copytree(tiny_model_dir, folder)
    index_path = folder / "jedi_model.json"
    index = json.loads(index_path.read_text())
    # sI != sT: at sI = sT the two orders are the same formula (test above)
    run = lambda pipe, **kw: pipe([PROMPT], _refs(2, 1), num_inference_steps=3, seed=0,  # noqa: E731
                                  guidance_scale=1.0, image_guidance_scale=8.0, **kw)
    pipe = JeDiPipeline(load_model(folder), max_references=2)
    first = run(pipe)
    assert first.settings["guidance_order"] == "image_first"
    text = run(pipe, guidance_order="text_first")
    assert text.settings["guidance_order"] == "text_first"
    assert np.abs(first.set_images[0].astype(int) - text.set_images[0].astype(int)).max() >= 1
    index_path.write_text(json.dumps(dict(index, sampling={"guidance_order": "text_first"})))
    pipe = JeDiPipeline(load_model(folder), max_references=2)
    by_folder = run(pipe)
    assert by_folder.settings["guidance_order"] == "text_first"
    np.testing.assert_array_equal(by_folder.set_images[0], text.set_images[0])
    assert run(pipe, guidance_order="image_first").settings["guidance_order"] == "image_first"
    with pytest.raises(PipelineInputError, match="composed prompts"):
        pipe([f"{PROMPT} AND a red ball"], _refs(2, 1), num_inference_steps=2)
    with pytest.raises(PipelineInputError, match="unknown guidance order"):
        run(pipe, guidance_order="both")
    index_path.write_text(json.dumps(dict(index, sampling={"guidance_order": "both"})))
    with pytest.raises(ConversionError, match="guidance_order must be one of"):
        load_model(folder)


def test_bfloat16_compute_stays_close_to_float32_on_the_shipped_model():
    """`--dtype bfloat16` (the accelerator setting) end to end: text encoder, UNet and VAE compute in
    bf16 from the same float32 weights, and the shipped JeDi-mini's images stay close to float32's."""
    from jedi_jax.demo import load_examples
    from jedi_jax.pipeline import JeDiPipeline

    example = load_examples()[0]
    images = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        pipe = JeDiPipeline.from_pretrained(None, dtype=dtype, max_references=1)
        out = pipe([example["prompts"][0]["prompt"]], example["reference_files"][:1], num_inference_steps=4, seed=3)
        assert out.settings["dtype"] == jnp.dtype(dtype).name
        assert all(jnp.asarray(p).dtype == jnp.float32 for p in jax.tree.leaves(pipe.model.unet.params))
        images[jnp.dtype(dtype).name] = np.asarray(out.images[0], np.float32) / 255.0  # (64, 64, 3)
    diff = np.abs(images["bfloat16"] - images["float32"])
    print(f"bf16 vs f32 images: mean abs {diff.mean():.4f}, max {diff.max():.3f}")
    assert images["float32"].std() > 0.05  # a real image, not a constant
    assert 0 < diff.mean() < 0.03  # bf16 really ran (not bit-identical) and stays close


def test_a_reference_flag_on_a_padding_slot_is_padding():
    """ref_mask outside member_mask (an API caller's layout; the pipeline never builds one) is
    ignored, as training ignores it: the slot is not returned as a known reference."""
    from jedi_jax.sampling.joint import JointSamplerConfig, sample_set
    from jedi_jax.schedulers.schedule import NoiseScheduleConfig, make_schedule

    B, N, h, C, T, D = 1, 3, 4, 2, 3, 8
    schedule = make_schedule(NoiseScheduleConfig())
    timesteps = jnp.asarray([999, 500, 0], jnp.int32)
    rng = np.random.default_rng(0)
    refs = jnp.asarray(rng.standard_normal((B, N, h, h, C)), jnp.float32)
    x_T = jnp.asarray(rng.standard_normal((B, N, h, h, C)), jnp.float32)
    ctx, empty = jnp.ones((B, N, T, D)), jnp.zeros((B, N, T, D))
    members = jnp.asarray([[True, True, False]])  # slot 2 is padding

    def run(ref_mask):
        layout = guidance.SetLayout(member_mask=members, ref_mask=jnp.asarray([ref_mask]))
        return np.asarray(sample_set(lambda p, x, t, c, m: 0.1 * x[..., :C], {}, schedule, timesteps, x_T, refs,
                                     layout, ctx, empty, 2.0, 3.0, jax.random.key(0), config=JointSamplerConfig()))

    flagged, clean = run([False, True, True]), run([False, True, False])
    np.testing.assert_array_equal(flagged, clean)
    assert not np.array_equal(flagged[0, 2], np.asarray(refs[0, 2]))


def test_sample_set_checks_per_step_scales_and_keeps_a_bfloat16_carry():
    """A (2,) scale over 4 steps was read with a clamped index ([2, 5, 5, 5]); a bfloat16 x_T with
    float32 references broke the loop's carry type when the references were re-noised."""
    from jedi_jax.sampling.joint import JointSamplerConfig, sample_set
    from jedi_jax.schedulers.schedule import NoiseScheduleConfig, make_schedule

    B, N, h, C, T, D = 1, 3, 4, 2, 3, 8
    schedule = make_schedule(NoiseScheduleConfig())
    timesteps = jnp.asarray([999, 666, 333, 0], jnp.int32)
    layout = guidance.SetLayout(member_mask=jnp.ones((B, N), bool), ref_mask=jnp.asarray([[True, False, False]]))
    refs = jnp.asarray(np.random.default_rng(0).standard_normal((B, N, h, h, C)), jnp.float32)
    ctx, empty = jnp.ones((B, N, T, D)), jnp.zeros((B, N, T, D))

    def unet_fn(params, x, t, c, m):  # a stand-in denoiser: 0.1 * the noisy channels
        return 0.1 * x[..., :C]

    def run(x_T, image_scale=2.0):
        return sample_set(unet_fn, {}, schedule, timesteps, x_T, refs, layout, ctx, empty, image_scale, 5.0,
                          jax.random.key(0), config=JointSamplerConfig())

    x_T = jnp.asarray(np.random.default_rng(1).standard_normal((B, N, h, h, C)), jnp.float32)
    for bad in (jnp.asarray([2.0, 3.0]), jnp.ones(7), jnp.ones((4, 1))):
        with pytest.raises(ValueError, match=r"image_scale must be one value \(\) or one per step \(4,\)"):
            run(x_T, bad)
    run(x_T, jnp.full((4,), 2.0))  # one per step is fine
    out = run(x_T.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
    # the known member comes back as its reference (in the sample's dtype)
    np.testing.assert_array_equal(np.asarray(out[0, 0]), np.asarray(refs[0, 0].astype(jnp.bfloat16)))
