"""DreamBench harness (jedi_jax.eval.dreambench): the benchmark file parses as DreamBooth defines it,
the run generates what the protocol asks for, scores it by its definition, resumes without
regenerating, and refuses what it cannot use with one line.

Tiny and hermetic: the random-weight tiny model folder, the three fixture photos, and an exact toy
scorer (a photo's embedding is its normalized mean colour) in place of DINO / CLIP, whose folders
cannot be downloaded here (their own parity tests: tests/test_image_text_embedders.py).
"""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jedi_jax.eval import dreambench as db

DATA = Path(__file__).parent / "data" / "dreambench"
PROMPTS = (DATA / db.PROMPTS_FILE).read_text()


def test_the_benchmark_file_parses_as_dreambooth_defines_it():
    classes, objects, live = db.parse_prompts_file(PROMPTS)
    assert len(classes) == 30 and len(objects) == 25 and len(live) == 25
    assert sum(c in db.LIVE_CLASSES for c in classes.values()) == 9  # 21 objects and 9 live subjects
    assert classes["grey_sloth_plushie"] == "stuffed animal" and classes["dog8"] == "dog"
    assert db.prompt_text(objects[0], "backpack") == "a backpack in the jungle"
    assert db.prompt_text(live[-1], "stuffed animal") == "a cube shaped stuffed animal"
    assert db.prompt_text(objects[0], "dog", "sks") == "a sks dog in the jungle"  # DreamBooth's own wording
    assert objects[:10] == live[:10] and objects[10] != live[10]  # the lists share their first 10 prompts


@pytest.mark.parametrize("text, problem", [
    ("Object Prompts\n'a {0} {1}'.format(u, c)\nLive Subject Prompts\n'a {0} {1}'.format(u, c)\n", "no 'Classes' line"),
    ("Classes\n\nObject Prompts\n'a {0} {1}'.format(u, c)\n", "no `subject_name,class` table"),
    ("Classes\nsubject_name,class\ndog,dog\nObject Prompts\n'a {0} {1}'.format(u, c)\n", "no live prompts"),
    ("Classes\ndog,dog\nObject Prompts\n'a {0} dog'.format(u, c)\nLive Subject Prompts\n'a {0} {1}'.format(u, c)\n",
     "has no {1}"),
])
def test_a_broken_benchmark_file_is_one_error_naming_the_problem(text, problem):
    with pytest.raises(db.DreamBenchError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        db.parse_prompts_file(text)


def make_bench(root: Path) -> Path:
    """A benchmark folder of DreamBooth's layout from the fixtures: red_cartoon (2 photos), dog (3: the
    dog photo, then the two red ones, so k=1 and k=2 reference different photos)."""
    (root / "red_cartoon").mkdir(parents=True)
    (root / "dog").mkdir()
    shutil.copy(DATA / "red_cartoon_00.jpg", root / "red_cartoon" / "00.jpg")
    shutil.copy(DATA / "red_cartoon_01.jpg", root / "red_cartoon" / "01.jpg")
    shutil.copy(DATA / "dog_04.jpg", root / "dog" / "00.jpg")
    shutil.copy(DATA / "red_cartoon_00.jpg", root / "dog" / "01.jpg")
    shutil.copy(DATA / "red_cartoon_01.jpg", root / "dog" / "02.jpg")
    (root / db.PROMPTS_FILE).write_text(PROMPTS)
    return root


def test_read_benchmark_finds_subjects_classes_and_photos(tmp_path):
    bench = db.read_benchmark(make_bench(tmp_path / "bench"))
    assert [(s.name, s.cls, s.live, len(s.photos)) for s in bench.subjects] == \
        [("dog", "dog", True, 3), ("red_cartoon", "cartoon", False, 2)]
    assert bench.templates(bench.subjects[0])[10] == "a {0} {1} wearing a red hat"


def test_read_benchmark_refusals(tmp_path):
    with pytest.raises(db.DreamBenchError, match="no such folder"):
        db.read_benchmark(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(db.DreamBenchError, match="no prompts_and_classes.txt"):
        db.read_benchmark(tmp_path / "empty")
    bench = make_bench(tmp_path / "bench")
    (bench / "unicorn").mkdir()
    shutil.copy(DATA / "dog_04.jpg", bench / "unicorn" / "00.jpg")
    with pytest.raises(db.DreamBenchError, match="'unicorn' is not in"):
        db.read_benchmark(bench)


class MeanColour:
    """A toy scorer with the scorers' interface: a photo's embedding is its unit mean RGB (+1 so no
    image is the zero vector); a prompt's is a fixed direction per colour word."""

    def __init__(self):
        self.calls = 0

    def image_embeds(self, images):
        self.calls += 1
        e = np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(1) + 1.0  # (n, 3)
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)

    def text_embeds(self, prompts):
        e = np.array([[1.0, 0.2, 0.2] if "red" in p else [0.3, 0.3, 1.0] for p in prompts])
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


class CountingPipeline:
    """The tiny pipeline, counting the images it is asked for."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.pipe(*args, **kwargs)


SETTINGS = db.Settings(k=(1, 2), prompts=2, seeds=2, steps=2)


@pytest.fixture(scope="module")
def first_run(tiny_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambench")
    bench = db.read_benchmark(make_bench(root / "bench"))
    pipe = CountingPipeline(tiny_pipeline)
    scorers = {"dino": MeanColour(), "clip": MeanColour()}
    results = db.run(pipe, bench, root / "out", SETTINGS, scorers=scorers, log=lambda *a: None)
    return root, bench, pipe, results


def test_a_run_generates_the_protocol_and_writes_every_output(first_run):
    root, bench, pipe, results = first_run
    out = root / "out"
    assert pipe.calls == 2 * 2 * 2 * 2  # k rows x subjects x prompts x seeds
    images = results["images"]
    assert len({r["image"] for r in images}) == 16 and all((out / r["image"]).is_file() for r in images)
    assert {r["prompt"] for r in images if r["subject"] == "dog"} == {"a dog in the jungle", "a dog in the snow"}
    # one seed per (subject, prompt, seed index), shared by the k rows; distinct otherwise
    by_k = {k: {(r["subject"], r["prompt_index"], r["seed_index"]): r["seed"] for r in images if r["k"] == k}
            for k in (1, 2)}
    assert by_k[1] == by_k[2] and len(set(by_k[1].values())) == 8
    assert sorted(p.name for p in (out / "grids").iterdir()) == \
        ["k1_dog.png", "k1_red_cartoon.png", "k2_dog.png", "k2_red_cartoon.png"]
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    report = (out / "report.md").read_text()
    assert "| JeDi k=1 |" in report and "| Real photos |" in report and "CLIP-T" in report


def test_scores_follow_the_metric_definitions(first_run):
    root, bench, _, results = first_run
    s = MeanColour()
    for r in results["images"][::5]:
        subject = next(x for x in bench.subjects if x.name == r["subject"])
        real = np.concatenate([s.image_embeds(db.load_rgb(p)[None]) for p in subject.photos])  # each at its size
        gen = s.image_embeds(db.load_rgb(root / "out" / r["image"])[None])[0]
        assert r["dino"] == pytest.approx(float(np.mean(real @ gen)), abs=1e-5)  # mean over all real photos
        assert r["clip_i"] == pytest.approx(r["dino"], abs=1e-6)  # the same toy scorer for both
        assert r["clip_t"] == pytest.approx(float(gen @ s.text_embeds([r["prompt"]])[0]), abs=1e-5)
    # the real-photo ceiling: red_cartoon's two photos against each other; mean over pairs for the dog
    red = np.concatenate([s.image_embeds(db.load_rgb(p)[None]) for p in bench.subjects[1].photos])
    assert results["real_photos"]["red_cartoon"]["dino"] == pytest.approx(float(red[0] @ red[1]), abs=1e-6)
    rows = results["rows"]
    per_subject = [np.mean([r["dino"] for r in results["images"] if r["k"] == 1 and r["subject"] == n])
                   for n in ("dog", "red_cartoon")]
    assert rows["JeDi k=1"]["dino"]["mean"] == pytest.approx(np.mean(per_subject))
    assert "clip_t" not in rows["Real photos"] and rows["Real photos"]["dino"]["n"] == 2


def test_rerun_resumes_without_generating_and_a_cut_record_is_redone(first_run, tiny_pipeline, tmp_path):
    root, bench, _, results = first_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    pipe = CountingPipeline(tiny_pipeline)
    scorers = {"dino": MeanColour(), "clip": MeanColour()}
    again = db.run(pipe, bench, out, SETTINGS, scorers=scorers, log=lambda *a: None)
    assert pipe.calls == 0 and again["rows"] == results["rows"]
    # a crash mid-write: the last record cut short, its image gone -> exactly that image is redone
    lines = (out / "records.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    (out / last["image"]).unlink()
    (out / "records.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:20]]))  # no newline: killed mid-line
    redone = db.run(pipe, bench, out, SETTINGS, scorers=scorers, log=lambda *a: None)
    assert pipe.calls == 1 and (out / last["image"]).is_file()
    assert redone["rows"] == results["rows"]  # the same seed gives the same image
    # the redone record was logged on a line of its own: a third run has nothing to do
    assert [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()][-1]["image"] == last["image"]
    db.run(pipe, bench, out, SETTINGS, scorers=scorers, log=lambda *a: None)
    assert pipe.calls == 1
    # resuming through a link to the run folder works too
    (tmp_path / "link").symlink_to(out)
    db.run(pipe, bench, tmp_path / "link", SETTINGS, scorers=scorers, log=lambda *a: None)
    assert pipe.calls == 1


def test_another_protocol_in_the_same_out_is_refused_and_overwrite_starts_again(first_run, tiny_pipeline, tmp_path):
    root, bench, _, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    other = db.Settings(k=(1,), prompts=1, seeds=1, steps=2)
    with pytest.raises(db.DreamBenchError, match=r"another protocol, differing in k \(\[1, 2\] -> \[1\]\); "
                                                r"prompts \(2 -> 1\); seeds \(2 -> 1\):"):
        db.run(tiny_pipeline, bench, out, other, log=lambda *a: None)
    pipe = CountingPipeline(tiny_pipeline)
    results = db.run(pipe, bench, out, other, overwrite=True, log=lambda *a: None)
    assert pipe.calls == 2 and len(list((out / "images").rglob("*.png"))) == 2
    assert results["rows"] == {} and "No metrics" in (out / "report.md").read_text()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(db.DreamBenchError, match="holds no earlier DreamBench run"):
            db.run(tiny_pipeline, bench, tmp_path / "theirs", other, overwrite=overwrite, log=lambda *a: None)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep"


def test_other_weights_or_other_photos_are_another_protocol(first_run, tiny_pipeline, tmp_path, monkeypatch):
    """A resume must not mix images of two models, or score old images against new photos."""
    import types

    root, bench, _, _ = first_run
    model = tiny_pipeline.model
    assert db.model_fingerprint(model) == db.model_fingerprint(model)
    components = {name: types.SimpleNamespace(params=c.params) for name, c in model.components.items()}
    bumped = jax.tree.map(lambda x: x, components["unet"].params)
    path, leaf = next(iter(jax.tree_util.tree_flatten_with_path(bumped)[0]))
    bumped = jax.tree_util.tree_map_with_path(lambda p, x: x + 1e-3 if p == path else x, bumped)
    other = types.SimpleNamespace(components=dict(components, unet=types.SimpleNamespace(params=bumped)))
    assert db.model_fingerprint(other) != db.model_fingerprint(model)

    photos = make_bench(tmp_path / "bench2")
    assert db.data_fingerprint(db.read_benchmark(photos)) == db.data_fingerprint(bench)
    shutil.copy(DATA / "dog_04.jpg", photos / "red_cartoon" / "01.jpg")  # another photo under the same name
    assert db.data_fingerprint(db.read_benchmark(photos)) != db.data_fingerprint(bench)

    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    with pytest.raises(db.DreamBenchError, match=r"differing in data \("):
        db.run(tiny_pipeline, db.read_benchmark(photos), out, SETTINGS, log=lambda *a: None)
    monkeypatch.setattr(db, "model_fingerprint", lambda m: "other weights")
    with pytest.raises(db.DreamBenchError, match=r"differing in model_weights \("):
        db.run(tiny_pipeline, bench, out, SETTINGS, log=lambda *a: None)


@pytest.mark.parametrize("args, problem", [
    (["--data", "MISSING"], "no such folder"),
    (["--subjects", "dog,unicorn"], "--subjects: unicorn not in the benchmark folder"),
    (["--k", "3", "--subjects", "red_cartoon"], "--k 3: subject red_cartoon has only 2 photos"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--prompts", "26"], "--prompts 26: the benchmark's prompt lists hold 25"),
    (["--subjects", "dog", "--out", "FOREIGN"], "exists and holds no earlier DreamBench run (run.json): give a new or empty folder"),
    (["--clip", "NOWHERE"], "--clip NOWHERE: no config.json there"),
])
def test_cli_mistakes_are_one_line_before_anything_loads(args, problem, tmp_path, capsys):
    bench = make_bench(tmp_path / "bench")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep")
    argv = ["--data", str(bench), "--out", str(tmp_path / "out")] + \
        [a.replace("MISSING", str(tmp_path / "x")).replace("FOREIGN", str(tmp_path / "foreign")) for a in args]
    with pytest.raises(SystemExit) as e:
        db.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and problem in err[-1], err
    assert not (tmp_path / "out").exists() and (tmp_path / "foreign" / "notes.txt").read_text() == "keep"


def test_cli_k_rows_are_distinct_and_sorted_and_ctrl_c_keeps_what_was_written(tiny_pipeline, tmp_path, capsys,
                                                                             monkeypatch):
    """--k 2,1,1 gives the rows k=1 and k=2 once each; a Ctrl-C in the middle is one line and exit
    130, keeps every image written, and the same command resumes from there."""
    from jedi_jax.pipeline import JeDiPipeline

    class InterruptedAfter(CountingPipeline):
        def __call__(self, *args, **kwargs):
            if self.calls == 3:
                raise KeyboardInterrupt
            return super().__call__(*args, **kwargs)

    pipe = InterruptedAfter(tiny_pipeline)
    monkeypatch.setattr(JeDiPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pipe))
    argv = ["--data", str(make_bench(tmp_path / "bench")), "--out", str(tmp_path / "out"), "--k", "2,1,1",
            "--subjects", "red_cartoon", "--prompts", "2", "--seeds", "1", "--steps", "2"]
    assert db.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: interrupted: the images written are kept in {tmp_path / 'out'}; re-run the same " \
                      "command to resume"
    assert len((tmp_path / "out" / "records.jsonl").read_text().splitlines()) == 3
    pipe.calls = 10  # no more interruptions
    assert db.main(argv) == 0 and pipe.calls == 11  # only the fourth image was left
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["protocol"]["k"] == [1, 2] and len(results["images"]) == 4


def test_cli_scores_with_dino_and_clip_folders(tiny_model_dir, clip_folder, dino_folder, tmp_path):
    """The command line end to end with real (tiny, random) DINO and CLIP folders: every metric is
    there and equals the scorers' own cosines on the written images."""
    from jedi_jax.eval.image_text_embedders import ClipScorer, DinoScorer

    bench = make_bench(tmp_path / "bench")
    out = tmp_path / "out"
    assert db.main(["--data", str(bench), "--model", str(tiny_model_dir), "--out", str(out), "--k", "1",
                    "--subjects", "red_cartoon", "--prompts", "2", "--seeds", "1", "--steps", "2",
                    "--dino", str(dino_folder[0]), "--clip", str(clip_folder[0])]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["scorers"] == ["clip", "dino"] and set(results["rows"]["JeDi k=1"]) == set(db.METRICS)
    dino, clip = DinoScorer.from_folder(dino_folder[0]), ClipScorer.from_folder(clip_folder[0])
    photos = [db.load_rgb(p) for p in sorted((bench / "red_cartoon").iterdir())]
    for r in results["images"]:
        image = db.load_rgb(out / r["image"])[None]
        real = np.concatenate([dino.image_embeds(photo[None]) for photo in photos])  # 2048 and 687 px: as they are
        assert r["dino"] == pytest.approx(float((dino.image_embeds(image) @ real.T).mean()), abs=1e-5)
        assert r["clip_t"] == pytest.approx(float(clip.image_embeds(image)[0] @ clip.text_embeds([r["prompt"]])[0]),
                                            abs=1e-5)
    assert "| JeDi k=1 |" in (out / "report.md").read_text()
