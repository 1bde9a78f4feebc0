"""Shared fixtures: a tiny random-weight JeDi model folder (same code paths as SD, seconds to build)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a minute or more on 2 CPU cores (trainers, the shipped model's sampler, full-size "
                   "parity); run first, one at a time per worker. -m 'not slow' skips them.")
    # xdist's default scheduler hands each worker a first block of consecutive tests (about an eighth
    # of the suite each with 2 workers) and never takes work back: with the slow tests first, every
    # one of them would land in worker 0's block. One test at a time makes slow-first list
    # scheduling: the slow tests spread over the workers, the quick ones fill in behind them.
    if getattr(config.option, "numprocesses", None) and config.getoption("maxschedchunk", None) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort: the order is otherwise kept), so none of them starts while the
    other worker has nothing left to do."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _own_compilation_cache(tmp_path_factory):
    """`python -m jedi_jax.sample` caches compiled programs in ~/.cache unless JEDI_JAX_CACHE says
    otherwise: every test, and every CLI it starts, uses a temp folder instead."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JEDI_JAX_CACHE", str(tmp_path_factory.mktemp("xla")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(request, tmp_path_factory):
    """One JAX persistent compilation cache for this test run: its xdist workers, and the trainers
    and CLIs they start as subprocesses (JAX_COMPILATION_CACHE_DIR), share the programs they compile,
    where before every test that built the shipped model's sampler or a :micro / :tiny trainer
    compiled it again (10-90 s each on 2 CPU cores). The folder is new for each run, so no test reads
    a program compiled by an earlier version of the code. Every program is kept, not only those that
    took over a second (JAX's default): a random init runs its initializers op by op, one compile of
    ~0.4 s per parameter shape (the tiny model folder: ~40 s, the same again in the other worker and
    in every subprocess that builds a model of those shapes); a cached one loads in milliseconds.
    `python -m jedi_jax.sample` keeps its own cache (JEDI_JAX_CACHE above)."""
    import jax
    from jax._src import compilation_cache

    # an xdist worker's basetemp is popen-gwN inside the run's folder: share that folder
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if hasattr(request.config, "workerinput") else base) / "xla_shared"
    folder.mkdir(exist_ok=True)
    settings = {"jax_compilation_cache_dir": str(folder), "jax_persistent_cache_min_compile_time_secs": 0}
    previous = {name: getattr(jax.config, name) for name in settings}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in settings.items():
            mp.setenv(name.upper(), str(value))  # the subprocesses' JAX reads these at import
            jax.config.update(name, value)
        compilation_cache.reset_cache()  # JAX fixes its cache's folder at the first compile
        yield folder
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from jedi_jax.models.tiny import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    from jedi_jax.pipeline import JeDiPipeline

    return JeDiPipeline.from_pretrained(tiny_model_dir, max_references=2)


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """(folder, torch model): a tiny CLIPModel folder as openai/clip-vit-large-patch14 has it."""
    from scorer_folders import write_clip_folder

    return write_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def dino_folder(tmp_path_factory):
    """(folder, torch model): a tiny ViTModel folder as facebook/dino-vits16 has it."""
    from scorer_folders import write_dino_folder

    return write_dino_folder(tmp_path_factory.mktemp("dino"))
