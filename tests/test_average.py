"""Weight averaging of model folders (jedi_jax.train.average): exact arithmetic, strict refusals."""
import json
import shutil

import jax
import numpy as np
import pytest


def _with_unet(src, dst, params):
    """A copy of model folder `src` whose UNet parameters are `params` (everything else the same bytes)."""
    from jedi_jax.convert.param_io import save_params

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "unet" / "params")
    save_params(dst / "unet" / "params", params)
    return dst


def test_average_is_the_weighted_mean_of_the_unets_and_keeps_the_rest(tiny_model_dir, tmp_path):
    from jedi_jax.loading import load_component
    from jedi_jax.convert.param_io import params_fingerprint
    from jedi_jax.train.average import average_folders

    a = load_component(tiny_model_dir, "unet").params
    rng = np.random.default_rng(0)
    b = jax.tree.map(lambda x: np.asarray(x) + rng.normal(size=x.shape).astype(np.float32), a)
    folder_b = _with_unet(tiny_model_dir, tmp_path / "b", b)

    out = average_folders([tiny_model_dir, folder_b], tmp_path / "soup", weights=[0.25, 0.75], log=lambda *_: None)
    got = load_component(out, "unet").params
    want = jax.tree.map(lambda x, y: 0.25 * np.asarray(x) + 0.75 * np.asarray(y), a, b)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6), got, want)
    # the mean is really between the two (a mean that returned either input would pass a shape test)
    assert params_fingerprint(got) not in (params_fingerprint(a), params_fingerprint(b))
    for name in ("vae", "text_encoder"):
        kept, source = load_component(out, name).params, load_component(tiny_model_dir, name).params
        assert params_fingerprint(kept) == params_fingerprint(source), name
    assert (out / "tokenizer").is_dir() and (out / "scheduler" / "scheduler_config.json").exists()

    # a uniform soup of a folder with itself is that folder
    same = average_folders([tiny_model_dir, tiny_model_dir], tmp_path / "self", log=lambda *_: None)
    assert params_fingerprint(load_component(same, "unet").params) == params_fingerprint(a)


def test_average_refuses_folders_that_are_not_finetunes_of_one_model(tiny_model_dir, tmp_path, capsys):
    from jedi_jax.convert.torch_naming import ConversionError
    from jedi_jax.models.tiny import write_random_model
    from jedi_jax.train.average import average_folders, main

    other = write_random_model(tmp_path / "other", seed=1)  # another VAE and text encoder
    with pytest.raises(ConversionError, match="vae parameters differ"):
        average_folders([tiny_model_dir, other], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad.tmp-*"))  # nothing half-written

    renamed = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, renamed)
    (renamed / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(ConversionError, match="tokenizer/ differs"):
        average_folders([tiny_model_dir, renamed], tmp_path / "bad")

    # a UNet trained to read another text layer is not a finetune of the same model, in either order
    layered = tmp_path / "layered"
    shutil.copytree(tiny_model_dir, layered)
    info = json.loads((layered / "jedi_model.json").read_text())
    info["sampling"] = dict(info.get("sampling") or {}, text_layer="tokens")
    (layered / "jedi_model.json").write_text(json.dumps(info))
    for pair in ([tiny_model_dir, layered], [layered, tiny_model_dir]):
        with pytest.raises(ConversionError, match="reads text layer"):
            average_folders(pair, tmp_path / "bad")

    for weights, problem in (("0.5,0.6", "sum to 1"), ("1", "1 values for 2 models"), ("a,b", "comma-separated"),
                             ("nan,0.5", "must be >= 0 and sum to 1"), ("inf,-inf", "must be >= 0")):
        code = main(["--models", str(tiny_model_dir), str(tiny_model_dir), "--weights", weights,
                     "--dst", str(tmp_path / "cli")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and problem in err and err.count("\n") == 0, err
    assert not (tmp_path / "cli").exists()
