"""Shared fixtures: a tiny random-weight JeDi model folder (same code paths as SD, seconds to build)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _own_compilation_cache(tmp_path_factory):
    """`python -m jedi_jax.sample` caches compiled programs in ~/.cache unless JEDI_JAX_CACHE says
    otherwise: every test, and every CLI it starts, uses a temp folder instead."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JEDI_JAX_CACHE", str(tmp_path_factory.mktemp("xla")))
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from jedi_jax.models.tiny import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    from jedi_jax.pipeline import JeDiPipeline

    return JeDiPipeline.from_pretrained(tiny_model_dir, max_references=2)
