"""Shared fixtures: a tiny random-weight JeDi model folder (same code paths as SD, seconds to build)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from jedi_jax.models.tiny import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    from jedi_jax.pipeline import JeDiPipeline

    return JeDiPipeline.from_pretrained(tiny_model_dir, max_references=2)
