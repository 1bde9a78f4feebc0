"""`pip install` from the repository (as the Colab notebook does: a built wheel, not an editable
install) brings every module and the embedded JeDi-mini.

An editable install imports from the source tree, so a subpackage that ``find_packages`` skips (a
folder without ``__init__.py``) works there and breaks only for a wheel: this test builds the wheel,
installs it into a bare folder and imports every module from there, away from the source tree.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_ASSET_MB = 60  # issue 5: the shipped checkpoint, at most 60 MB in all


def _source_files() -> list[str]:
    """Every file the package must ship: its modules and its assets, as wheel paths."""
    root = REPO / "jedi_jax"
    out = []
    for path in root.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(REPO).as_posix()
        if path.suffix == ".py" or rel.startswith("jedi_jax/assets/"):
            out.append(rel)
    return sorted(out)


def test_wheel_ships_every_module_and_asset_and_imports_without_the_source_tree(tmp_path):
    # Build from a copy: an in-tree build reuses build/lib/, which may hold modules a clean build drops.
    src, wheel_dir, target = tmp_path / "src", tmp_path / "wheel", tmp_path / "site"
    shutil.copytree(REPO / "jedi_jax", src / "jedi_jax", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "setup.py", src / "setup.py")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheel_dir), str(src)], check=True, capture_output=True)
    (wheel,) = wheel_dir.glob("jedi_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = set(z.namelist())
        asset_bytes = sum(i.file_size for i in z.infolist() if i.filename.startswith("jedi_jax/assets/"))
    missing = [f for f in _source_files() if f not in shipped]
    assert not missing, f"the wheel lacks {missing[:10]}"
    assert {"jedi_jax/assets/jedi_mini/jedi_model.json", "jedi_jax/sampling/joint.py"} <= shipped
    assert asset_bytes < MAX_ASSET_MB * 1e6, f"assets are {asset_bytes / 1e6:.1f} MB"

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    # Import every module of the installed copy, from a folder where the source tree is not on sys.path.
    probe = (
        "import importlib, pkgutil, jedi_jax\n"
        "from pathlib import Path\n"
        f"assert Path(jedi_jax.__file__).resolve().is_relative_to(Path({str(target)!r}).resolve()), jedi_jax.__file__\n"
        "names = [m.name for m in pkgutil.walk_packages(jedi_jax.__path__, 'jedi_jax.')\n"
        "         if not m.name.endswith('__main__') and '.assets.' not in m.name]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "from jedi_jax.assets import DEFAULT_MODEL_DIR\n"
        "from jedi_jax.pipeline import JeDiPipeline\n"
        "assert (DEFAULT_MODEL_DIR / 'jedi_model.json').exists(), DEFAULT_MODEL_DIR\n"
        "pipe = JeDiPipeline.from_pretrained()\n"
        "print(len(names), pipe.model.folder)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    count, folder = res.stdout.split()[-2:]
    assert int(count) >= 60 and Path(folder).resolve().is_relative_to(target.resolve())
