"""Random-access sources of same-subject image sets (grain/``RandomAccessDataSource`` style).

Every source has ``len(source)`` and ``source[i]`` -> one SET RECORD:

    {'images':   uint8 (n, H, W, 3),
     'captions': list[str] (n),
     'masks':    bool (n, H, W)      (absent when the data has no masks),
     'subject':  str}

Sources:

* :class:`MiniWorldSource` generates mini-world sets on the fly (no files; training can run
  without any dataset on disk). Deterministic: ``source[i]`` is ``mini_world.make_set(split, i)``.
* :class:`ArrayRecordSetSource` reads a TFDS set dataset in ``array_record`` format (as built by
  ``tfds_sets.MiniJediSets``, or any dataset with the same features) WITHOUT TensorFlow.
  ``backend="tfds"`` reads through ``tfds.builder_from_directory(dir).as_data_source(split)``
  (TFDS's numpy-only decoding path; needs tensorflow-datasets, not TensorFlow);
  ``backend="native"`` reads with ``array_record`` alone and decodes the serialized
  ``tf.train.Example`` with the minimal protobuf decoder below (needs only array_record + PIL).
  ``"auto"`` (default) = tfds when importable, else native. Both give identical records.

:func:`write_array_record` writes records in the same on-disk example format without TFDS or
TensorFlow (what a TFDS-less machine can use to produce readable files).
"""
from __future__ import annotations

import glob
import io
import json
import os
import struct
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from jedi_jax.data import mini_world

SetRecord = dict[str, Any]

# TFDS names of data sets that hold mini-world renders (dataset_info.json "name"): not to be mirrored.
MINI_WORLD_DATASETS = ("mini_jedi_sets",)
# Written next to a bare .array_record file by write_array_record(..., flip_safe=False).
SIDECAR_SUFFIX = ".meta.json"


# ----------------------------------------------------------------------------------------------
# Minimal tf.train.Example protobuf codec (only what set datasets use: bytes/int64/float lists)
# ----------------------------------------------------------------------------------------------

def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """Yields (field_number, wire_type, value) of a protobuf message; LEN values are memoryviews."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
            yield field, wire, val
            continue
        if wire == 2:
            n, pos = _read_varint(buf, pos)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos + n > end:  # a slice past the end would silently come back short
            raise ValueError(f"truncated protobuf: field {field} needs {n} bytes, {end - pos} left")
        yield field, wire, buf[pos:pos + n]
        pos += n


def _decode_feature(buf: memoryview) -> list[Any]:
    for kind, _, payload in _fields(buf):
        if kind == 1:  # BytesList
            return [bytes(v) for f, _, v in _fields(payload) if f == 1]
        if kind == 2:  # FloatList (packed or not)
            out: list[float] = []
            for f, wire, v in _fields(payload):
                if f == 1:
                    out.extend(np.frombuffer(v, "<f4").tolist())
            return out
        if kind == 3:  # Int64List (packed or not)
            ints: list[int] = []
            for f, wire, v in _fields(payload):
                if f != 1:
                    continue
                if wire == 0:  # one varint, two's complement like the packed ones
                    ints.append(v - (1 << 64) if v >= 1 << 63 else v)
                else:
                    p = 0
                    while p < len(v):
                        x, p = _read_varint(v, p)
                        ints.append(x - (1 << 64) if x >= 1 << 63 else x)
            return ints
    return []


def parse_example(serialized: bytes) -> dict[str, list[Any]]:
    """A serialized ``tf.train.Example`` -> {feature name: list of values} (no TensorFlow)."""
    out: dict[str, list[Any]] = {}
    for f, _, features in _fields(memoryview(serialized)):
        if f != 1:
            continue
        for g, _, entry in _fields(features):
            if g != 1:
                continue
            key, value = None, None
            for h, _, v in _fields(entry):
                if h == 1:
                    key = bytes(v).decode("utf-8")
                elif h == 2:
                    value = _decode_feature(v)
            if key is not None:
                out[key] = value if value is not None else []
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def serialize_example(features: dict[str, Sequence[bytes] | Sequence[int] | Sequence[float]]) -> bytes:
    """{name: list of bytes | ints | floats} -> serialized ``tf.train.Example`` (sorted keys)."""
    entries = []
    for key in sorted(features):
        values = list(features[key])
        if all(isinstance(v, (bytes, bytearray)) for v in values):
            feat = _len_field(1, b"".join(_len_field(1, bytes(v)) for v in values))
        elif all(isinstance(v, (int, np.integer)) for v in values):
            packed = b"".join(_varint(int(v) & ((1 << 64) - 1)) for v in values)
            feat = _len_field(3, _len_field(1, packed) if values else b"")
        else:
            packed = struct.pack(f"<{len(values)}f", *values)
            feat = _len_field(2, _len_field(1, packed) if values else b"")
        entries.append(_len_field(1, _len_field(1, key.encode("utf-8")) + _len_field(2, feat)))
    return _len_field(1, b"".join(entries))


# ----------------------------------------------------------------------------------------------
# Record encode/decode
# ----------------------------------------------------------------------------------------------

def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _unpng(b: bytes, mode: str = "RGB") -> np.ndarray:
    """PNG bytes -> uint8 array in `mode` ("RGB" images, "L" masks): a palette, grey or alpha PNG that
    a dataset builder encoded itself decodes to its colours (alpha dropped), as TFDS's 3-channel image
    feature decodes it, not to palette indices."""
    with Image.open(io.BytesIO(b)) as im:
        if im.mode != mode:
            im = im.convert(mode)
        return np.asarray(im)


def encode_record(record: SetRecord) -> bytes:
    """A set record -> serialized example with the TFDS set features (PNG images, 0/255 masks)."""
    feats: dict[str, list[Any]] = {
        "images": [_png(np.asarray(im, np.uint8)) for im in record["images"]],
        "captions": [c.encode("utf-8") for c in record["captions"]],
        "subject": [record["subject"].encode("utf-8")],
    }
    if record.get("masks") is not None:
        # nonzero = subject, whatever the dtype (a uint8 0/255 mask times 255 would wrap to 0/1)
        feats["masks"] = [_png((np.asarray(m) != 0).astype(np.uint8) * 255) for m in record["masks"]]
    return serialize_example(feats)


def _stack_images(images: Sequence[np.ndarray]) -> np.ndarray:
    arrs = [np.asarray(im) for im in images]
    arrs = [a if a.ndim == 3 else np.repeat(a[..., None], 3, -1) for a in arrs]
    return np.stack(arrs).astype(np.uint8, copy=False) if arrs else np.zeros((0, 0, 0, 3), np.uint8)


def _stack_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    arrs = [np.asarray(m) for m in masks]
    arrs = [a[..., 0] if a.ndim == 3 else a for a in arrs]
    return np.stack(arrs) > 127 if arrs else np.zeros((0, 0, 0), bool)


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray, np.bytes_)) else str(x)


def decode_record(serialized: bytes) -> SetRecord:
    """Serialized set example -> set record (numpy/PIL only)."""
    ex = parse_example(serialized)
    rec: SetRecord = {
        "images": _stack_images([_unpng(b) for b in ex["images"]]),
        "captions": [_text(c) for c in ex.get("captions", [])],
        "subject": _text(ex["subject"][0]) if ex.get("subject") else "",
    }
    if "masks" in ex:
        rec["masks"] = _stack_masks([_unpng(b, "L") for b in ex["masks"]])
    return rec


def _from_tfds_example(ex: dict[str, Any]) -> SetRecord:
    rec: SetRecord = {
        "images": _stack_images(ex["images"]),
        "captions": [_text(c) for c in ex.get("captions", [])],
        "subject": _text(ex.get("subject", b"")),
    }
    if "masks" in ex:
        rec["masks"] = _stack_masks(ex["masks"])
    return rec


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

def _tfds_importable() -> bool:
    try:
        import tensorflow_datasets  # noqa: F401
        return True
    except Exception:  # pragma: no cover - environment dependent
        return False


def path_flip_safe(path: str | Sequence[str]) -> bool:
    """Whether the set data at ``path`` may be mirrored: False for a TFDS folder whose
    dataset_info.json names a mini-world data set (MINI_WORLD_DATASETS), or for files whose
    ``SIDECAR_SUFFIX`` sidecar says ``"flip_safe": false``; True otherwise (real photos mirror fine)."""
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        files = _shards(os.path.join(os.fspath(path), "*.array_record-*"))
        folders = {os.fspath(path)}
    else:
        files = [os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]
        folders = {os.path.dirname(os.path.abspath(f)) for f in files}  # one shard of a TFDS folder: the folder says
    for folder in sorted(folders):
        info = os.path.join(folder, "dataset_info.json")
        if os.path.exists(info):
            with open(info) as f:
                if json.load(f).get("name") in MINI_WORLD_DATASETS:
                    return False
    for file in files:
        if os.path.exists(file + SIDECAR_SUFFIX):
            with open(file + SIDECAR_SUFFIX) as f:
                if json.load(f).get("flip_safe", True) is False:
                    return False
    return True


def _shards(pattern: str) -> list[str]:
    """The files matching `pattern`, sorted, without flip_safe sidecars (they match it too)."""
    return sorted(f for f in glob.glob(pattern) if not f.endswith(SIDECAR_SUFFIX))


def split_files(dataset_dir: str, split: str) -> list[str]:
    """The array_record shards of ``split`` in a TFDS dataset version folder."""
    files = _shards(os.path.join(dataset_dir, f"*-{split}.array_record-*"))
    if not files:
        raise FileNotFoundError(f"no {split!r} array_record files in {dataset_dir}")
    return files


class ArrayRecordSetSource:
    """Reads set records from array_record files without TensorFlow.

    ``path``: a TFDS dataset version folder (``<data_dir>/mini_jedi_sets/<config>/1.0.0``, holding
    ``dataset_info.json`` and ``*-<split>.array_record-*`` shards), or one array_record file, or a
    list of files (native backend only for the last two).
    """

    def __init__(self, path: str | Sequence[str], split: str = "train", backend: str = "auto"):
        if backend not in ("auto", "tfds", "native"):
            raise ValueError(f"backend must be auto/tfds/native, got {backend!r}")
        is_dir = isinstance(path, (str, os.PathLike)) and os.path.isdir(path)
        if backend == "auto":
            has_info = is_dir and os.path.exists(os.path.join(path, "dataset_info.json"))
            backend = "tfds" if has_info and _tfds_importable() else "native"
        if backend == "tfds" and not is_dir:
            raise ValueError("the tfds backend needs a TFDS dataset version folder")
        if backend == "native" and "[" in split:
            raise ValueError(f"split {split!r}: split slices need the tfds backend (pip install tensorflow-datasets); "
                             "the native reader takes whole splits")
        self.path = path
        self.split = split
        self.backend = backend
        if backend == "tfds":  # TFDS resolves the split itself (it may be a slice such as "train[:90%]")
            self.files = []
        elif is_dir:
            self.files = split_files(os.fspath(path), split)
        elif isinstance(path, (str, os.PathLike)):
            self.files = [os.fspath(path)]
        else:
            self.files = [os.fspath(p) for p in path]
        self._source = None
        # Mini-world data must not be mirrored, whether rendered on the fly or read from files.
        self.flip_safe = path_flip_safe(path)

    def _open(self):
        if self._source is None:
            if self.backend == "tfds":
                import tensorflow_datasets as tfds
                builder = tfds.builder_from_directory(os.fspath(self.path))
                self._source = builder.as_data_source(split=self.split)
            else:
                from array_record.python.array_record_data_source import ArrayRecordDataSource
                self._source = ArrayRecordDataSource(self.files)
        return self._source

    def __len__(self) -> int:
        return len(self._open())

    def close(self) -> None:
        """Closes the open array_record readers (they reopen on the next read)."""
        exit_ = getattr(self._source, "__exit__", None)
        if exit_ is not None:
            exit_(None, None, None)
        self._source = None

    def __getitem__(self, index: int) -> SetRecord:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(index)
        item = self._open()[int(index) % n]
        try:
            return _from_tfds_example(item) if self.backend == "tfds" else decode_record(item)
        except Exception as e:  # a corrupt or foreign record: say which (a bare KeyError 'images' does not)
            raise ValueError(f"{self.path} split {self.split!r}: record {int(index) % n} is not a set example "
                             f"({type(e).__name__}: {e})") from e

    def __getstate__(self):  # picklable for multi-process loaders: reopen lazily
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"ArrayRecordSetSource({self.path!r}, split={self.split!r}, backend={self.backend!r})"


class MiniWorldSource:
    """Mini-world sets generated on the fly: ``source[i] == mini_world.make_set(split, first_set + i,
    ...)`` as a set record. ``num_sets`` may be huge (nothing is precomputed); ``num_subjects`` None
    gives a new subject per set (so ``first_set`` picks other subjects). ``with_labels`` adds
    'labels' (dict of (n,) int32 arrays) and 'category'."""

    # Not to be mirrored: a mirrored train render of (background, left) is (background, right), a
    # held-out pair of the test split, and subjects carry chiral marks (SetLoader refuses hflip > 0).
    flip_safe = False

    def __init__(self, split: str = "train", num_sets: int = 1_000_000, set_size: int = 4,
                 num_subjects: int | None = None, with_masks: bool = True, with_labels: bool = False,
                 first_set: int = 0):
        if split not in mini_world.SPLITS:
            raise ValueError(f"split must be one of {mini_world.SPLITS}")
        if first_set < 0:
            raise ValueError(f"first_set must be >= 0, got {first_set}")
        self.first_set = int(first_set)
        self.split = split
        self.num_sets = int(num_sets)
        self.set_size = int(set_size)
        self.num_subjects = num_subjects
        self.with_masks = with_masks
        self.with_labels = with_labels

    def __len__(self) -> int:
        return self.num_sets

    def __getitem__(self, index: int) -> SetRecord:
        if not -self.num_sets <= index < self.num_sets:
            raise IndexError(index)
        s = mini_world.make_set(self.split, self.first_set + int(index) % self.num_sets, n=self.set_size,
                                num_subjects=self.num_subjects)
        rec: SetRecord = {"images": s["images"], "captions": s["captions"], "subject": s["subject"]}
        if self.with_masks:
            rec["masks"] = s["masks"]
        if self.with_labels:
            rec["labels"] = s["labels"]
            rec["category"] = s["category"]
        return rec

    def __repr__(self) -> str:
        return (f"MiniWorldSource(split={self.split!r}, num_sets={self.num_sets}, "
                f"set_size={self.set_size}, num_subjects={self.num_subjects}, first_set={self.first_set})")


def write_array_record(path: str, records: Iterable[SetRecord], flip_safe: bool = True) -> int:
    """Writes set records to one array_record file (group_size:1, random access) in the TFDS set
    example format. No TensorFlow/TFDS needed. Returns the number written. ``flip_safe=False``
    (mini-world renders) writes a ``PATH.meta.json`` sidecar that makes the loader refuse hflip > 0."""
    from array_record.python.array_record_module import ArrayRecordWriter
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sidecar = os.fspath(path) + SIDECAR_SUFFIX
    if flip_safe:
        if os.path.exists(sidecar):
            os.remove(sidecar)
    else:
        with open(sidecar, "w") as f:
            json.dump({"flip_safe": False}, f)
    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    n = 0
    try:
        for rec in records:
            writer.write(encode_record(rec))
            n += 1
    finally:
        writer.close()
    return n


def records_equal(a: SetRecord, b: SetRecord) -> bool:
    """Same images, masks (or both absent), captions and subject."""
    if set(k for k in a if k in ("images", "masks", "captions", "subject")) != \
            set(k for k in b if k in ("images", "masks", "captions", "subject")):
        return False
    same = np.array_equal(a["images"], b["images"]) and list(a["captions"]) == list(b["captions"]) \
        and a["subject"] == b["subject"]
    if "masks" in a:
        same = same and np.array_equal(np.asarray(a["masks"], bool), np.asarray(b["masks"], bool))
    return bool(same)


def describe(source) -> str:
    r = source[0]
    return json.dumps({"len": len(source), "images": list(r["images"].shape),
                       "masks": list(r["masks"].shape) if "masks" in r else None,
                       "captions": r["captions"][:2], "subject": r["subject"]})
