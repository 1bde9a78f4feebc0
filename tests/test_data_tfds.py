"""TFDS same-subject set format: build a tiny dataset, read it back WITHOUT TensorFlow."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jedi_jax.data import set_source
from jedi_jax.data.set_source import ArrayRecordSetSource, MiniWorldSource, records_equal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter where TensorFlow is NOT installed as far as imports can tell (every
# import finder answers "not found" for tensorflow*), then read the dataset and compare.
_NO_TF_READER = textwrap.dedent("""
    import sys, json
    class _Hide:
        def __init__(self, f): self.f = f
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                return None
            fs = getattr(self.f, "find_spec", None)
            return fs(name, path, target) if fs else None
        def __getattr__(self, a): return getattr(self.f, a)
    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    try:
        import tensorflow
        raise SystemExit("tensorflow still importable")
    except ModuleNotFoundError:
        pass
    from jedi_jax.data.set_source import ArrayRecordSetSource, MiniWorldSource, records_equal
    path, backends, sizes = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
    out = {}
    for backend in backends:
        for split, n in sizes.items():
            src = ArrayRecordSetSource(path, split, backend=backend)
            ref = MiniWorldSource(split, num_sets=n, set_size=4)
            assert len(src) == n, (backend, split, len(src))
            for i in range(n):
                assert records_equal(src[i], ref[i]), (backend, split, i)
            r = src[0]
            out[backend + "/" + split] = [str(r["images"].dtype), list(r["masks"].shape), type(r["captions"][0]).__name__]
    out["tensorflow_loaded"] = "tensorflow" in sys.modules
    print("RESULT" + json.dumps(out))
""")


def _read_without_tf(path, backends, sizes):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _NO_TF_READER, path, ",".join(backends), json.dumps(sizes)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_example_codec_roundtrip():
    feats = {"images": [b"\x00\x01png", b""], "captions": ["a ball".encode(), "é".encode()],
             "ints": [0, 1, -5, 2**40], "floats": [0.5, -2.0]}
    back = set_source.parse_example(set_source.serialize_example(feats))
    assert back["images"] == feats["images"] and back["captions"] == feats["captions"]
    assert back["ints"] == feats["ints"] and back["floats"] == feats["floats"]
    # ... and agrees with the real proto (tensorflow-datasets is a test requirement: setup.py [test])
    from tensorflow_datasets.proto import tf_example_pb2
    ex = tf_example_pb2.Example.FromString(set_source.serialize_example(feats))
    assert list(ex.features.feature["captions"].bytes_list.value) == feats["captions"]
    assert list(ex.features.feature["ints"].int64_list.value) == feats["ints"]
    assert list(ex.features.feature["floats"].float_list.value) == feats["floats"]
    assert set_source.parse_example(ex.SerializeToString())["ints"] == feats["ints"]


def test_both_writers_keep_masks_of_any_dtype():
    """Masks are "nonzero = subject". A uint8 0/255 mask times 255 wraps to 0/1 and a uint8 0/1 mask
    written as is reads back below the 127 threshold: both writers once lost every subject pixel."""
    import io

    from PIL import Image

    from jedi_jax.data import tfds_sets

    blob = np.zeros((2, 8, 8), bool)
    blob[:, 2:5, 3:6] = True
    images = np.zeros((2, 8, 8, 3), np.uint8)
    for name, masks in (("bool", blob), ("uint8 0/1", blob.astype(np.uint8)), ("uint8 0/255", blob * np.uint8(255)),
                        ("float 0/1", blob.astype(np.float32))):
        record = {"images": images, "masks": masks, "captions": ["a", "b"], "subject": "s"}
        back = set_source.decode_record(set_source.encode_record(record))["masks"]
        np.testing.assert_array_equal(back, blob, err_msg=f"encode_record, {name} masks")
        pngs = tfds_sets.encode_set(record)["masks"]
        read = np.stack([np.asarray(Image.open(io.BytesIO(b))) > 127 for b in pngs])  # the readers' threshold
        np.testing.assert_array_equal(read, blob, err_msg=f"tfds encode_set, {name} masks")


def test_native_array_record_roundtrip(tmp_path):
    ref = MiniWorldSource("train", num_sets=6, set_size=4)
    path = str(tmp_path / "sets.array_record")
    assert set_source.write_array_record(path, (ref[i] for i in range(len(ref)))) == 6
    src = ArrayRecordSetSource(path, backend="native")
    assert len(src) == 6
    for i in range(6):
        assert records_equal(src[i], ref[i])
    import pickle
    assert records_equal(pickle.loads(pickle.dumps(src))[2], ref[2])
    src.close()  # closes the readers; a later read reopens them
    assert src._source is None and records_equal(src[3], ref[3])
    src.close()
    # no-mask records stay mask-less
    nomask = MiniWorldSource("test", num_sets=2, with_masks=False)
    set_source.write_array_record(str(tmp_path / "nm.array_record"), (nomask[i] for i in range(2)))
    r = ArrayRecordSetSource(str(tmp_path / "nm.array_record"))[1]
    assert "masks" not in r and records_equal(r, nomask[1])


def test_array_record_files_carry_whether_they_may_be_mirrored(tmp_path):
    # Mini-world renders must not be flipped (a mirrored train (background, left) is a held-out
    # (background, right)); written to files, they keep saying so, and the loader and the config
    # check refuse hflip > 0 on them. Files that say nothing (real photos) may be flipped.
    from jedi_jax.train import data as data_lib
    from jedi_jax.train.loader import SetLoader
    import ml_collections

    ref = MiniWorldSource("train", num_sets=4, set_size=3)
    path = str(tmp_path / "world.array_record")
    set_source.write_array_record(path, (ref[i] for i in range(4)), flip_safe=False)
    src = ArrayRecordSetSource(path, backend="native")
    assert src.flip_safe is False and os.path.exists(path + set_source.SIDECAR_SUFFIX)
    with pytest.raises(ValueError, match="ArrayRecordSetSource must not be mirrored"):
        SetLoader(src, batch_size=2, set_size=3, image_size=16, seed=0, hflip=0.5)
    SetLoader(src, batch_size=2, set_size=3, image_size=16, seed=0, hflip=0.0)
    cfg = ml_collections.ConfigDict({"source": f"array_record:{path}"})
    assert data_lib.renders_mini_world(cfg)
    # rewritten as flip-safe data, the stale sidecar goes with the old content
    set_source.write_array_record(path, (ref[i] for i in range(4)))
    assert not os.path.exists(path + set_source.SIDECAR_SUFFIX)
    assert ArrayRecordSetSource(path, backend="native").flip_safe is True and not data_lib.renders_mini_world(cfg)
    # a folder: any shard's sidecar, or a mini-world name in dataset_info.json, marks the data set
    folder = tmp_path / "sets" / "1.0.0"
    set_source.write_array_record(str(folder / "sets-train.array_record-00000-of-00001"), (ref[i] for i in range(2)))
    assert set_source.path_flip_safe(str(folder))
    (folder / "dataset_info.json").write_text(json.dumps({"name": set_source.MINI_WORLD_DATASETS[0]}))
    assert not set_source.path_flip_safe(str(folder))
    shards = ArrayRecordSetSource(str(folder), "train", backend="native")
    assert shards.flip_safe is False
    # one shard file of that folder, named alone: the folder's dataset_info.json still says it
    assert not set_source.path_flip_safe(str(folder / "sets-train.array_record-00000-of-00001"))
    # a shard's own sidecar marks the folder too, and is not read as a shard
    (folder / "dataset_info.json").unlink()
    set_source.write_array_record(str(folder / "sets-train.array_record-00000-of-00001"), (ref[i] for i in range(2)),
                                  flip_safe=False)
    shards = ArrayRecordSetSource(str(folder), "train", backend="native")
    assert shards.flip_safe is False and len(shards.files) == 1 and len(shards) == 2


def test_truncated_or_foreign_records_fail_naming_the_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    ref = MiniWorldSource("train", num_sets=1, set_size=2)[0]
    good = set_source.encode_record(ref)
    with pytest.raises(ValueError, match="truncated protobuf"):  # cut short: once decoded silently
        set_source.decode_record(good[: len(good) - 40])
    path = str(tmp_path / "mixed.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for item in (good, good[:-40], set_source.serialize_example({"labels": [1, 2]})):
        writer.write(item)
    writer.close()
    src = ArrayRecordSetSource(path, backend="native")
    assert records_equal(src[0], ref)
    for index in (1, 2):  # truncated; a valid example of another schema
        with pytest.raises(ValueError, match=f"mixed.array_record split 'train': record {index} is not a set example"):
            src[index]
    with pytest.raises(ValueError, match="split slices need the tfds backend"):
        ArrayRecordSetSource(str(tmp_path), "train[:90%]", backend="native")


def _can_build_with_tfds():
    # TFDS's builder machinery needs tensorflow-datasets and importlib_resources (etils.epath);
    # our builder hands TFDS PNG bytes, so no TensorFlow op runs while building.
    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow_datasets", "importlib_resources"))


def test_tfds_build_and_read_without_tensorflow(tmp_path):
    sizes = {"train": 8, "test": 4}
    assert _can_build_with_tfds(), "the [test] extra installs tensorflow-datasets and importlib_resources"
    from jedi_jax.data import tfds_sets
    builder = tfds_sets.build(str(tmp_path), "tiny")
    path = os.fspath(builder.data_dir)
    assert os.path.exists(os.path.join(path, "dataset_info.json"))
    backends = ["tfds", "native"]
    out = _read_without_tf(path, backends, sizes)
    assert out.pop("tensorflow_loaded") is False
    for key, (dtype, mask_shape, cap_type) in out.items():
        assert dtype == "uint8" and mask_shape == [4, 64, 64] and cap_type == "str", key
    # in-process reads agree with the generator too (auto backend)
    src = ArrayRecordSetSource(path, "test")
    assert records_equal(src[3], MiniWorldSource("test", 4)[3])
    assert src.flip_safe is False  # TFDS names it mini_jedi_sets: not to be mirrored
    assert np.array_equal(src[0]["images"], MiniWorldSource("test", 4)[0]["images"])
