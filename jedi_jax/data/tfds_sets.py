"""TFDS format for same-subject image sets (the training format of all JeDi data).

One example = one set of images of the same subject:

    images   Sequence(Image(H, W, 3), PNG)    the set members (variable length allowed)
    captions Sequence(Text)                   one caption per member
    masks    Sequence(Image(H, W, 1), PNG)    foreground masks, 0/255 (optional for real data:
                                              a builder without masks simply omits the feature)
    subject  Text                             subject id/name

``MiniJediSets`` builds it from the procedural mini world (``mini_world.make_set``) with splits
train/test in ``array_record`` format (random access; read without TensorFlow by
``set_source.ArrayRecordSetSource``). Real same-subject data (S3-like) uses the same features:
copy ``_info`` and write a ``_generate_examples`` that yields these dicts.

Building goes through TFDS's writer: ``pip install -e .[data]`` (tensorflow-datasets, no
TensorFlow). Images are handed to TFDS already PNG-encoded (by PIL), so the build runs no
TensorFlow op and works without TensorFlow installed (the test extra installs no TensorFlow,
and tests/test_data_tfds.py builds the dataset there). Reading never needs TensorFlow.

    python -m jedi_jax.data.tfds_sets --data_dir /tmp/tfds --config tiny
    python -m jedi_jax.data.tfds_sets --data_dir /tmp/tfds --num_train 20000 --num_test 500 --set_size 4
"""
from __future__ import annotations

import argparse
import dataclasses
import io
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jedi_jax.data import mini_world

RES = mini_world.RES
DATASET_VERSION = "1.0.0"


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, C) array (C in 1, 3); bool masks become 0/255."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def set_features(resolution: int = RES, with_masks: bool = True) -> tfds.features.FeaturesDict:
    """The features of a same-subject set example (shared by every JeDi set dataset)."""
    feats: dict[str, Any] = {
        "images": tfds.features.Sequence(
            tfds.features.Image(shape=(resolution, resolution, 3), encoding_format="png")),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "subject": tfds.features.Text(),
    }
    if with_masks:
        feats["masks"] = tfds.features.Sequence(
            tfds.features.Image(shape=(resolution, resolution, 1), encoding_format="png"))
    return tfds.features.FeaturesDict(feats)


def encode_set(record: dict[str, Any]) -> dict[str, Any]:
    """A set record ({'images' uint8 (n,H,W,3), 'captions', 'masks'?, 'subject'}) -> TFDS example
    with PNG bytes (so TFDS never needs TensorFlow to encode)."""
    ex = {
        "images": [encode_png(im) for im in record["images"]],
        "captions": list(record["captions"]),
        "subject": record["subject"],
    }
    if record.get("masks") is not None:
        ex["masks"] = [encode_png(np.asarray(m) != 0) for m in record["masks"]]  # nonzero = subject, any dtype
    return ex


@dataclasses.dataclass
class MiniJediSetsConfig(tfds.core.BuilderConfig):
    """How many sets of how many members; ``num_subjects`` None = a new subject per set."""
    num_train: int = 2000
    num_test: int = 200
    set_size: int = 4
    num_subjects: int | None = None


# Under `python -m` this file is also `__main__`; TFDS must see the builder of the importable module
# (it resolves the builder's code path), so the `__main__` copy is not registered and not used.
class MiniJediSets(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """Same-subject sets of the procedural mini world (see ``jedi_jax.data.mini_world``)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Mini world v1: 10 categories, 10 backgrounds, 3 placements."}
    BUILDER_CONFIGS = [
        MiniJediSetsConfig(name="tiny", description="8 train / 4 test sets of 4 (tests)",
                           num_train=8, num_test=4, set_size=4),
        MiniJediSetsConfig(name="small", description="2000 train / 200 test sets of 4",
                           num_train=2000, num_test=200, set_size=4),
        MiniJediSetsConfig(name="large", description="50000 train / 1000 test sets of 4",
                           num_train=50000, num_test=1000, set_size=4),
    ]
    DEFAULT_CONFIG_NAME = "small"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Sets of renders of one procedural subject in different captioned contexts.",
            features=set_features(RES, with_masks=True),
            supervised_keys=None,
            # Keep generation order: record i of a split is set i (same as MiniWorldSource[i]).
            disable_shuffling=True,
            homepage="https://github.com/",  # procedural: nothing to download
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, num_sets: int) -> Iterator[tuple[str, dict[str, Any]]]:
        cfg = self.builder_config
        for i in range(num_sets):
            rec = mini_world.make_set(split, i, n=cfg.set_size, num_subjects=cfg.num_subjects)
            yield f"{split}_{i:08d}", encode_set(rec)


def make_builder(data_dir: str, config: str | MiniJediSetsConfig = "tiny", **overrides) -> MiniJediSets:
    """A ``MiniJediSets`` builder; ``overrides`` (num_train, num_test, set_size, num_subjects) make
    a custom config named ``custom_<train>_<test>_<size>`` (so different sizes never share files)."""
    if overrides:
        base = next(c for c in MiniJediSets.BUILDER_CONFIGS if c.name == config) \
            if isinstance(config, str) else config
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(MiniJediSetsConfig)
                  if f.name in ("num_train", "num_test", "set_size", "num_subjects")}
        fields.update(overrides)
        name = "custom_{num_train}_{num_test}_{set_size}".format(**fields)
        if fields.get("num_subjects") is not None:
            name += f"_s{fields['num_subjects']}"
        config = MiniJediSetsConfig(name=name, description="custom size", **fields)
    return MiniJediSets(data_dir=data_dir, config=config, file_format="array_record")


def build(data_dir: str, config: str | MiniJediSetsConfig = "tiny", **overrides) -> MiniJediSets:
    """Builds (download_and_prepare) the dataset into data_dir; returns the builder."""
    builder = make_builder(data_dir, config, **overrides)
    builder.download_and_prepare()
    return builder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.data.tfds_sets", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--config", default="tiny", choices=[c.name for c in MiniJediSets.BUILDER_CONFIGS])
    p.add_argument("--num_train", type=int)
    p.add_argument("--num_test", type=int)
    p.add_argument("--set_size", type=int)
    p.add_argument("--num_subjects", type=int)
    a = p.parse_args(argv)
    overrides = {k: v for k, v in vars(a).items()
                 if k in ("num_train", "num_test", "set_size", "num_subjects") and v is not None}
    builder = build(a.data_dir, a.config, **overrides)
    print(builder.info)
    print("written to", builder.data_dir)


if __name__ == "__main__":
    from jedi_jax.data import tfds_sets as _module
    _module.main()
