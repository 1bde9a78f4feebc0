"""Package data: the embedded JeDi-mini model, its tokenizer and the demo's example references."""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = ASSETS_DIR / "jedi_mini"  # the embedded default model (a jedi_jax model folder)
EXAMPLES_DIR = ASSETS_DIR / "examples"  # test-split subjects rendered by the mini world
