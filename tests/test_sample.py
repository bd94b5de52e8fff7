"""sample.py on a trained checkpoint: the data set and its records, resuming, determinism, labels, samplers and
refusals."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD, ROOT, compose_config, run_script
from PIL import Image

from fiberaug.data import FolderDataModule
from fiberaug.imaging import to_uint8
from fiberaug.jobs import read_records
from fiberaug.models import load_generator, read_checkpoint
from fiberaug.models.base import GenerativeModule
from fiberaug.tasks import run_task
from fiberaug.tasks.inputs import checkpoint_data
from fiberaug.tasks.sample import sample


def _sample(ckpt: Path, out: Path, *overrides: str) -> Path:
    cfg = compose_config("sample", [f"ckpt_path={ckpt}", f"output_dir={out}", *overrides])
    return sample(cfg)


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    """The data set's images by path (the hidden preview left out)."""
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("[!.]*/*.png"))}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sample_script_writes_a_data_set_with_a_record_of_each_image(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result = run_script("sample.py", f"ckpt_path={ckpt}", "num_samples=5", "steps=3", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    # ImageFolder layout: one folder per class drawn (0 to 4 in turn), named by the training classes.
    assert sorted(_pixels(tmp_path)) == ["0/000000.png", "1/000001.png", "2/000002.png", "3/000003.png",
                                         "4/000004.png"]
    first = np.asarray(Image.open(tmp_path / "0" / "000000.png"))
    assert first.shape == (8, 8)  # the trained size, grayscale
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["label"], r["index"], r["draw"]) for r in rows] == [
        (f"{i}/{i:06d}.png", str(i), i, i) for i in range(5)]
    assert all(r["copy_score"] > 1 / 3 for r in rows)  # the copy filter is on by default; the model copies nothing
    checkpoint_sha256 = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert {(r["seed"], r["checkpoint_sha256"], r["model"], r["sampler"], r["steps"]) for r in rows} == {
        (0, checkpoint_sha256, "DiffusionModule", "dpmpp", 3)}
    assert rows[2]["sha256"] == hashlib.sha256((tmp_path / "2" / "000002.png").read_bytes()).hexdigest()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["checkpoint"] == str(ckpt.resolve()) and run["job"]["checkpoint_sha256"] == checkpoint_sha256
    assert "sample.py" in run["command"] and run["versions"]["torch"] == torch.__version__
    # The preview: one column per class drawn, each sample enlarged ×8 under a band with the class names; hidden, so
    # that readers of the data set (data=folder, ImageFolder) do not take it for an image of it.
    grid = np.asarray(Image.open(tmp_path / ".preview.png"))
    header = grid.shape[0] - (64 + 4)
    assert grid.shape[1] == 5 * 66 + 2 and header >= 14 and grid[:header].max() > 128
    assert np.array_equal(grid[header + 2 : header + 66, 2:66], np.kron(first, np.ones((8, 8), np.uint8)))
    assert "sampling" in result.stderr  # the progress bar
    datamodule = FolderDataModule(root=str(tmp_path), image_size=8, channels=1, val_fraction=0, cache_mb=0,
                                  cache_dir=None)
    datamodule.setup("fit")
    assert datamodule.class_names == ["0", "1", "2", "3", "4"] and len(datamodule.train_set) == 5


def test_num_per_class_draws_that_many_of_each_class(trained_run, tmp_path):
    out = _sample(trained_run / "checkpoints" / "last.ckpt", tmp_path, "num_per_class=2", "labels=[3,5]", "steps=2")
    assert sorted(_pixels(out)) == ["3/000000.png", "3/000002.png", "5/000001.png", "5/000003.png"]


def test_a_killed_run_then_the_same_command_ends_as_one_uninterrupted_run(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    args = [sys.executable, str(ROOT / "sample.py"), f"ckpt_path={ckpt}", "num_samples=300", "steps=1",
            "batch_size=7"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    killed = subprocess.Popen([*args, f"output_dir={tmp_path / 'killed'}"], start_new_session=True, **quiet)
    manifest, deadline = tmp_path / "killed" / "manifest.jsonl", time.monotonic() + HANG_GUARD
    while not (manifest.is_file() and manifest.stat().st_size > 20_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    made = len(manifest.read_bytes().splitlines())
    assert 0 < made < 300, "the run was not killed in the middle"
    for out in ("killed", "clean"):  # the same command again, in this process (the script's startup is slow)
        _sample(ckpt, tmp_path / out, *args[3:])
    resumed, clean = snapshot(tmp_path / "killed"), snapshot(tmp_path / "clean")
    runs = [json.loads(files.pop("run.json")) for files in (resumed, clean)]
    for run in runs:  # the two differ only in the command line that made them
        run.pop("command")
    assert resumed == clean and runs[0] == runs[1]


class Planted:
    """Stands in for the model's sampling: draw i gives a held-out digit of the class asked for, except the draws
    in `plant`, which give the image made from a training digit of that class (copies) or a digit of another class."""

    def __init__(self, ckpt: Path, plant: dict[int, str]) -> None:
        data = checkpoint_data(read_checkpoint(ckpt))
        self.train, self.train_labels = data.reference_images("train")
        self.held, self.held_labels = data.reference_images("val")
        self.plant = plant

    def __call__(self, model, draws, labels, seed=0, progress=False, **options) -> torch.Tensor:
        images = []
        for draw, label in zip(draws, labels.tolist()):
            how = self.plant.get(draw)
            if how == "off-class":
                label = (label + 1) % 10
            pool, pool_labels = (self.held, self.held_labels) if how in (None, "off-class") else (
                self.train, self.train_labels)
            mine = [i for i, known in enumerate(pool_labels) if known == label]
            image = pool[mine[draw % len(mine)]]
            if how == "jpeg":
                buffer = io.BytesIO()
                Image.fromarray(((image[0] + 1) * 127.5).round().byte().numpy()).save(buffer, "JPEG", quality=75)
                image = torch.from_numpy(np.asarray(Image.open(buffer), np.float32))[None] / 127.5 - 1
            elif how == "shifted":
                image = torch.roll(image, 1, dims=2)
            images.append(image)
        return torch.stack(images)


def test_copies_and_off_class_images_are_rejected_recorded_and_replaced(trained_run, tmp_path, monkeypatch):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    planted = Planted(ckpt, {0: "exact", 1: "jpeg", 2: "shifted", 4: "off-class"})
    monkeypatch.setattr(GenerativeModule, "sample_draws", lambda model, *a, **k: planted(model, *a, **k))
    out = _sample(ckpt, tmp_path / "d", "num_samples=6", "batch_size=6", "filter.min_class_confidence=0.5",
                  "keep_rejected=true")
    records = list(read_records(out / "manifest.jsonl"))
    assert [(r["draw"], r["status"], r.get("reason")) for r in records[:6]] == [
        (0, "rejected", "copy"), (1, "rejected", "copy"), (2, "rejected", "copy"), (3, "ok", None),
        (4, "rejected", "off-class"), (5, "ok", None)]
    assert all(r["copy_score"] < 1 / 3 for r in records[:3]) and records[4]["class_confidence"] < 0.5
    # The empty positions 0, 1, 2 and 4 are drawn again, with their classes, by the next batch (draws 6 to 9).
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["index"], r["label"], r["draw"]) for r in rows] == [
        (0, "0", 6), (1, "1", 7), (2, "2", 8), (3, "3", 3), (4, "4", 9), (5, "5", 5)]
    assert sorted(p.relative_to(tmp_path / "d-rejected").as_posix() for p in (tmp_path / "d-rejected").rglob("*")
                  if p.is_file()) == ["0/000000.png", "1/000001.png", "2/000002.png", "4/000004.png"]
    copy = np.asarray(Image.open(tmp_path / "d-rejected" / "0" / "000000.png"))
    assert any(np.array_equal(copy, image[..., 0]) for image in to_uint8(planted.train))  # the exact copy, as drawn


def test_sampling_stops_at_max_attempts_with_what_it_kept(trained_run, tmp_path, monkeypatch):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    planted = Planted(ckpt, {i: "exact" for i in range(1, 100)})  # only draw 0 is new
    monkeypatch.setattr(GenerativeModule, "sample_draws", lambda model, *a, **k: planted(model, *a, **k))
    cfg = compose_config("sample", [f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "num_samples=3", "max_attempts=5"])
    with pytest.raises(SystemExit, match=r"only 1 of 3 images were accepted in max_attempts=5 draws \(4 copy\)"):
        run_task(sample, cfg)
    assert sorted(_pixels(tmp_path)) == ["0/000000.png"]


def test_each_batch_is_on_disk_before_the_next_is_drawn(trained_run, tmp_path, monkeypatch):
    """Streaming, so memory stays one batch whatever num_samples (benchmarks/samplers.py measures the peak)."""
    seen, original = [], GenerativeModule.sample_draws

    def counting(model, draws, *args, **kwargs):
        seen.append((list(draws), len(_pixels(tmp_path)), len((tmp_path / "manifest.jsonl").read_bytes().splitlines())))
        return original(model, draws, *args, **kwargs)

    monkeypatch.setattr(GenerativeModule, "sample_draws", counting)
    _sample(trained_run / "checkpoints" / "last.ckpt", tmp_path, "num_samples=5", "batch_size=2", "steps=1")
    assert seen == [([0, 1], 0, 0), ([2, 3], 2, 2), ([4], 4, 4)]


def test_another_job_in_the_folder_is_refused_unless_overwrite(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    _sample(ckpt, tmp_path, "num_samples=3", "steps=1")
    before = snapshot(tmp_path)
    cfg = compose_config("sample", [f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "num_samples=3", "steps=2"])
    with pytest.raises(SystemExit, match=r"holds another job \(its run.json differs in: sampling\)"):
        run_task(sample, cfg)
    assert snapshot(tmp_path) == before
    _sample(ckpt, tmp_path, "num_samples=2", "steps=2", "labels=[7]", "overwrite=true")
    assert sorted(_pixels(tmp_path)) == ["7/000000.png", "7/000001.png"]  # the other job's images are gone


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_images_whatever_the_batch_size(trained_run, tmp_path, sampler):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    common = ["num_samples=4", "steps=3", f"sampler={sampler}", "eta=1.0"]
    a = _pixels(_sample(ckpt, tmp_path / "a", *common, "seed=7", "batch_size=4"))
    again = _pixels(_sample(ckpt, tmp_path / "again", *common, "seed=7", "batch_size=4"))
    b = _pixels(_sample(ckpt, tmp_path / "b", *common, "seed=7", "batch_size=3"))
    c = _pixels(_sample(ckpt, tmp_path / "c", *common, "seed=8", "batch_size=4"))
    assert a.keys() == again.keys() and all(np.array_equal(a[k], again[k]) for k in a)
    # Another batch size draws the same noise; only the kernels' summation order may move a pixel by one level.
    assert a.keys() == b.keys() and all(np.abs(a[k].astype(int) - b[k]).max() <= 1 for k in a)
    assert any(np.abs(a[k].astype(int) - c[k]).max() > 1 for k in a)


def test_labels_by_name_or_index_and_guidance(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = _sample(ckpt, tmp_path / "x", "num_samples=4", "steps=2", "labels=[7,'3']", "guidance_scale=3")
    assert sorted(_pixels(out)) == ["3/000001.png", "3/000003.png", "7/000000.png", "7/000002.png"]


def test_guidance_scale_reaches_the_sampler(trained_run, tmp_path, monkeypatch):
    """A 10-step model's samples saturate at ±1, which hides guidance; the scale handed on is checked instead."""
    import fiberaug.models.diffusion as diffusion
    from fiberaug.diffusion import guided

    scales = []

    def recording(net, condition, uncondition, guidance_scale):
        scales.append(guidance_scale)
        return guided(net, condition, uncondition, guidance_scale)

    monkeypatch.setattr(diffusion, "guided", recording)
    _sample(trained_run / "checkpoints" / "last.ckpt", tmp_path, "num_samples=2", "steps=2", "guidance_scale=3")
    assert scales == [3.0]


def test_loaded_model_is_the_trained_one(trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    model = load_generator(ckpt)
    assert model.class_names == [str(i) for i in range(10)]
    assert model.hparams.image_size == 8 and not model.training
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]  # the EMA weights
    loaded = model.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt does not exist"),
        (["labels=[giraffe]"], "labels: 'giraffe' is not a class of this model; it knows (index=name): 0=0"),
        (["labels=[10]"], "labels: 10 is not a class of this model"),
        (["sampler=euler"], "sampler='euler' is not available; choose one of: ddpm, ddim"),
        (["steps=5000"], "steps=5000 must be an integer from 1 to 1000"),
    ],
)
def test_bad_options_are_one_line_errors(trained_run, tmp_path, overrides, message):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_config("sample", [f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "num_samples=2", *overrides])
    with pytest.raises(SystemExit) as exc:
        run_task(sample, cfg)
    assert message in str(exc.value)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "model.ckpt").write_text("hello")
    cfg = compose_config("sample", [f"ckpt_path={tmp_path / 'model.ckpt'}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match=r"is not a FiberAug checkpoint \(a \.ckpt written by train\.py\) or export"):
        run_task(sample, cfg)


def test_hugging_face_imagefolder_loads_the_data_set_with_its_metadata(trained_run, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = _sample(trained_run / "checkpoints" / "last.ckpt", tmp_path / "d", "num_samples=4", "labels=[2,5]",
                  "steps=2")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    rows = sorted(loaded, key=lambda row: row["index"])
    assert [(row["label"], row["index"], row["draw"]) for row in rows] == [("2", 0, 0), ("5", 1, 1), ("2", 2, 2),
                                                                           ("5", 3, 3)]
    pixels = _pixels(out)
    assert all(np.array_equal(np.asarray(row["image"]), pixels[f"{row['label']}/{row['index']:06d}.png"])
               for row in rows)
    assert {row["checkpoint_sha256"] for row in rows} == {json.loads((out / "run.json").read_text())["job"][
        "checkpoint_sha256"]}
