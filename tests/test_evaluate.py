"""evaluate.py: folders or a checkpoint in, metrics.json / report.png / nearest.png out; task=utility; and the
metrics during training."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, run_script, save
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_gan import GAN_TINY
from test_metrics import TinyInception

from fiberaug.callbacks import SampleMetrics
from fiberaug.data import DigitsDataModule
from fiberaug.imaging import to_uint8
from fiberaug.models import read_checkpoint
from fiberaug.tasks import run_task
from fiberaug.tasks.evaluate import evaluate
from fiberaug.tasks.inputs import checkpoint_data, read_folder, stratified_subset
from fiberaug.tasks.train import train


def _digit_folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """real/<class>/*.png: 24×24 gray digits; fake/<class>/*.png: 16×16 RGB copies of them, laid out as sample.py
    writes its data sets; other/: held-out digits of the same classes."""
    data = load_digits()
    images = (data.images / 16 * 255).astype(np.uint8).repeat(3, axis=1).repeat(3, axis=2)  # 24×24
    for i in range(60):
        save(tmp_path / "real" / f"digit{data.target[i]}" / f"{i}.png", images[i])
        rgb = np.repeat(np.asarray(torch.nn.functional.interpolate(
            torch.tensor(images[i], dtype=torch.float32)[None, None], size=16, mode="area")[0, 0]).round()
            .astype(np.uint8)[..., None], 3, axis=2)
        save(tmp_path / "fake" / f"digit{data.target[i]}" / f"{i:06d}.png", rgb)
    for i in range(60, 120):
        save(tmp_path / "other" / f"digit{data.target[i]}" / f"{i}.png", images[i])
    return tmp_path / "real", tmp_path / "fake", tmp_path / "other"


def _evaluate(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "eval"
    run_task(evaluate, compose_config("evaluate", [f"output_dir={out}", "overwrite=true", *overrides]))
    return json.loads((out / "metrics.json").read_text())


def test_folders_of_other_sizes_and_modes_are_compared_at_a_stated_common_size(tmp_path):
    real, fake, _ = _digit_folders(tmp_path)
    result = run_script("evaluate.py", f"real_dir={real}", f"fake_dir={fake}", f"output_dir={tmp_path / 'out'}",
                        "metrics=[swd,prdc,memorisation,class_consistency]")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("swd ") and "SWD" in line for line in lines), result.stdout
    assert "compared at 16×16, RGB" in result.stdout
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    values = summary["metrics"]
    # The fakes are the real digits themselves, shrunk: copies of every one, read as their own class.
    assert values["memorisation"] == 1.0
    assert values["class_consistency"] > 0.9
    assert summary["fake"]["count"] == 60 and summary["real"]["size"] == [1, 16, 16]
    assert "sampling" not in result.stderr  # nothing was drawn
    for name in ("report.png", "nearest.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000


def test_held_out_images_are_neither_copies_nor_far_from_real(tmp_path):
    real, _, other = _digit_folders(tmp_path)
    copies = _evaluate(tmp_path, f"real_dir={real}", f"fake_dir={real}", "metrics=[swd,memorisation]")["metrics"]
    held_out = _evaluate(tmp_path, f"real_dir={real}", f"fake_dir={other}", "metrics=[swd,memorisation]")["metrics"]
    assert copies["memorisation"] == 1.0 and held_out["memorisation"] < 0.1
    assert copies["swd"] < held_out["swd"]


def test_results_follow_the_seed(tmp_path):
    real, _, other = _digit_folders(tmp_path)
    common = [f"real_dir={real}", f"fake_dir={other}", "metrics=[swd]"]
    first, again = (_evaluate(tmp_path, *common, "seed=1")["metrics"] for _ in range(2))
    assert first == again
    assert _evaluate(tmp_path, *common, "seed=2")["metrics"]["swd"] != first["swd"]


def test_a_checkpoint_is_measured_against_the_images_it_was_trained_with(trained_run, tmp_path):
    summary = _evaluate(tmp_path, f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "num_samples=30",
                        "steps=2", "metrics=[swd,memorisation,class_consistency]")
    assert summary["real"]["count"] == 90 and summary["train"]["count"] == 1707  # the digits' 5% / 95% split
    assert summary["fake"]["count"] == 30 and summary["fake"]["size"] == [1, 8, 8]
    assert {"swd", "memorisation", "class_consistency", "classifier_accuracy"} <= summary["metrics"].keys()


def test_fid_and_kid_come_from_a_local_inception_file(tmp_path):
    real, fake, other = _digit_folders(tmp_path)
    weights = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(TinyInception()), str(weights))
    same = _evaluate(tmp_path, f"real_dir={real}", f"fake_dir={real}", f"inception={weights}", "metrics=[fid]")
    apart = _evaluate(tmp_path, f"real_dir={real}", f"fake_dir={other}", f"inception={weights}", "metrics=[fid]")
    assert same["metrics"]["fid"] < 1e-3 < apart["metrics"]["fid"]
    assert "kid" in apart["metrics"] and not any("FID/KID skipped" in n for n in apart["notes"])
    without = _evaluate(tmp_path, f"real_dir={real}", f"fake_dir={other}", "metrics=[fid]")
    assert "fid" not in without["metrics"] and any("inception=" in n for n in without["notes"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "nothing to evaluate: pass fake_dir=DIR"),
        (["fake_dir=FAKE"], "no real images: pass real_dir=DIR"),
        (["fake_dir=FAKE", "real_dir=/no/such/dir"], "real_dir=/no/such/dir is not a folder"),
        (["fake_dir=FAKE", "real_dir=FAKE", "metrics=[sharpness]"], "'sharpness' not known"),
        (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt does not exist"),
        (["fake_dir=EMPTY", "real_dir=FAKE"], "fake_dir=EMPTY holds no images"),
        (["fake_dir=BROKEN", "real_dir=FAKE"], "fake_dir=BROKEN: none of its 1 image files could be read"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, overrides, message):
    _, fake, _ = _digit_folders(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "00000.png").write_bytes(b"not a png")
    folders = {"FAKE": fake, "EMPTY": tmp_path / "empty", "BROKEN": tmp_path / "broken"}
    overrides = [functools.reduce(lambda o, k: o.replace(k, str(folders[k])), folders, o) for o in overrides]
    message = functools.reduce(lambda m, k: m.replace(k, str(folders[k])), folders, message)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace("[", r"\[")):
        run_task(evaluate, compose_config("evaluate", [f"output_dir={tmp_path / 'out'}", *overrides]))


def test_max_images_takes_a_seeded_random_subset_with_every_class(tmp_path):
    """Three class folders of four images: 8 of them keep all three classes (3, 3, 2), drawn by the seed."""
    for c, name in enumerate(("a", "b", "c")):
        for i in range(4):
            save(tmp_path / "real" / name / f"{i}.png", np.full((8, 8), 60 * c + 10 * i, np.uint8))
    first = read_folder(tmp_path / "real", 8, limit=8, seed=0)
    assert first.class_names == ["a", "b", "c"] and first.available == 12
    assert sorted(np.bincount(first.labels).tolist()) == [2, 3, 3]
    again, other = (read_folder(tmp_path / "real", 8, limit=8, seed=seed) for seed in (0, 3))
    assert torch.equal(first.images, again.images) and not torch.equal(first.images, other.images)
    skewed = stratified_subset([0] * 9 + [1], 5, seed=0)
    assert len(skewed) == 5 and 9 in skewed  # the small class keeps its one image


def test_evaluate_says_how_many_images_it_used(tmp_path, capsys):
    real, fake, _ = _digit_folders(tmp_path)
    summary = _evaluate(tmp_path, f"real_dir={real}", f"fake_dir={fake}", f"train_dir={real}", "max_images=20",
                        "metrics=[swd]")
    assert (summary["real"]["count"], summary["real"]["available"]) == (20, 60)
    assert (summary["fake"]["count"], summary["fake"]["available"]) == (60, 60)
    out = capsys.readouterr().out
    assert "real: 20 of 60 images" in out and "train: 20 of 60 images" in out


def test_a_sample_py_data_set_is_read_by_its_class_folders_without_the_preview(tmp_path):
    """sample.py writes <class>/000000.png and a hidden .preview/grid.png, which is not a sample."""
    for i, label in enumerate(("cat", "dog", "cat")):
        save(tmp_path / "samples" / label / f"{i:06d}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    save(tmp_path / "samples" / ".preview" / "grid.png", np.zeros((20, 30, 3), np.uint8))
    samples = read_folder(tmp_path / "samples", 8)
    assert samples.class_names == ["cat", "dog"] and samples.labels == [0, 0, 1]
    assert samples.images[:, 0, 0, 0].tolist() == pytest.approx([-1, 80 / 127.5 - 1, 40 / 127.5 - 1], abs=1e-6)


def test_earlier_results_are_not_overwritten(tmp_path):
    real, fake, _ = _digit_folders(tmp_path)
    args = [f"real_dir={real}", f"fake_dir={fake}", "metrics=[swd]", f"output_dir={tmp_path / 'out'}"]
    run_task(evaluate, compose_config("evaluate", args))
    with pytest.raises(SystemExit, match="already holds metrics.json"):
        run_task(evaluate, compose_config("evaluate", args))


# --- checkpoints record their images ---


def test_checkpoints_record_the_content_of_every_training_and_validation_image(trained_run, image_folder, tmp_path):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    record = ckpt["fiberaug"]["data"]
    digits = load_digits()
    arrays = np.round(digits.images / 16 * 255).astype(np.uint8)[..., None]
    everything = {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays}
    assert len(record["train"]) == 1707 and len(record["val"]) == 90
    assert set(record["train"]) | set(record["val"]) <= everything and not set(record["train"]) & set(record["val"])

    root = image_folder(broken=False)
    folder = ["data=folder", f"data.root={root}", "data.image_size=8", "data.channels=3", "trainer.max_steps=1"]
    train(compose_config("train", [*TINY, *folder], tmp_path / "run"))
    record = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["fiberaug"]["data"]
    files = {hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.suffix in (".png", ".jpg",
                                                                                                 ".tif")}
    assert set(record["train"]) | set(record["val"]) == files


def test_a_photo_removed_or_replaced_during_a_run_loses_no_checkpoint(image_folder, tmp_path, caplog):
    """The record holds what was trained on: the removed file's content as it was read, and both contents of the
    replaced one (each may have been drawn), with a warning naming what went missing. The files change after the
    first checkpoint (step 5), so the last one must record them afresh."""
    root = image_folder(broken=False)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.suffix in (".png", ".jpg",
                                                                                                      ".tif")}
    overrides = [*TINY, "data=folder", f"data.root={root}", "data.image_size=8", "data.channels=3",
                 "+callbacks.tamper._target_=probes.TamperWithData", f"+callbacks.tamper.note={tmp_path / 'note.json'}",
                 "+callbacks.tamper.step=6"]
    with caplog.at_level(logging.WARNING):
        train(compose_config("train", overrides, tmp_path / "run"))
    note = json.loads((tmp_path / "note.json").read_text())
    removed, replaced = Path(note["removed"]), Path(note["replaced"])
    record = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["fiberaug"]["data"]
    assert record["gone"] == [str(removed)] and str(removed) in caplog.text and "went missing" in caplog.text
    assert set(record["train"]) | set(record["val"]) == set(before.values()) | {note["new"]}
    assert before[removed] in record["train"] and {before[replaced], note["new"]} <= set(record["train"])


# --- during training ---


def test_sample_metrics_are_logged_at_every_validation_and_rank_the_checkpoints(tmp_path):
    monitor = ["callbacks.model_checkpoint.monitor=val/swd", "callbacks.model_checkpoint.mode=min"]
    train(compose_config("train", [*TINY, *monitor, "model.lr=3e-2"], tmp_path))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    swd = {e.step + 1: e.value for e in events.Scalars("val/swd")}
    assert sorted(swd) == [5, 10] and {"val/memorisation", "loss/val"} <= set(events.Tags()["scalars"])
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    (state,) = (v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert ckpt["global_step"] == min(swd, key=swd.get)
    assert state["best_model_score"].item() == pytest.approx(min(swd.values()), rel=1e-6)


# --- task=utility ---


def test_utility_table_end_to_end_on_a_tiny_split(trained_run, tmp_path, capsys):
    out = tmp_path / "utility"
    run_task(evaluate, compose_config("evaluate", [
        "task=utility", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"output_dir={out}",
        "utility.shots=10", "utility.synthetic_per_class=3", "utility.seeds=2", "utility.steps=150", "steps=2",
    ]))
    printed = capsys.readouterr().out
    table = json.loads((out / "utility.json").read_text())
    assert table["held_out"] == 90 and table["shots_per_class"] == 10 and table["generator_trained_on"] == 1707
    assert list(table["accuracy"]) == ["real", "real + classical", "real + synthetic", "real + classical + synthetic"]
    assert all(len(row["runs"]) == 2 for row in table["accuracy"].values())
    assert table["accuracy"]["real"]["mean"] > 0.4, "100 real digits taught the classifier next to nothing"
    assert "real + classical + synthetic" in printed and "±" in printed


def test_utility_measures_a_written_data_set_named_by_its_run_json(trained_run, tmp_path):
    """Stand-ins for data sets sample.py wrote: 30 more training digits per class, in their own class folders or in
    the next class's. Read by their folders, the first helps the 10-shot classifier and the second ruins it."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    images, labels = checkpoint_data(read_checkpoint(ckpt)).reference_images("train")
    accuracy = {}
    for shift in (0, 1):
        written = tmp_path / f"written{shift}"
        for c in range(10):
            for k, i in enumerate([i for i, label in enumerate(labels) if label == c][-30:]):
                save(written / str((c + shift) % 10) / f"{k:06d}.png", to_uint8(images[i : i + 1])[0, ..., 0])
        (written / "run.json").write_text(json.dumps({"checkpoint": str(ckpt)}))
        cfg = compose_config("evaluate", ["task=utility", f"synthetic_dir={written}", f"output_dir={written}-u",
                                          "utility.seeds=1", "utility.steps=80"])
        table = run_task(evaluate, cfg)
        assert table["synthetic"] == str(written) and table["synthetic_per_class"] == 30
        accuracy[shift] = {name: row["mean"] for name, row in table["accuracy"].items()}
    assert accuracy[0]["real + synthetic"] >= accuracy[0]["real"] > 0.8, accuracy
    assert accuracy[1]["real + synthetic"] < 0.5 < accuracy[1]["real"], accuracy


def test_utility_refuses_held_out_images_the_generator_was_trained_on(trained_run, tmp_path):
    cfg = compose_config("evaluate", ["task=utility", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                                      "data=digits", "data.image_size=8", "data.split_seed=7",
                                      f"output_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=r"\d+ of the 90 held-out images trained ckpt_path="):
        run_task(evaluate, cfg)
    assert not (tmp_path / "utility.json").exists()


@pytest.mark.parametrize("monitor", ["loss/val", "val/swd"])
def test_sample_metrics_follow_every_n_epochs_also_when_they_rank_the_checkpoints(tmp_path, monitor):
    """Two epochs, each validated: the metrics only at the second, and a val/swd ranking saves only there."""
    overrides = [*TINY, "callbacks.metrics.every_n_epochs=2", f"callbacks.model_checkpoint.monitor={monitor}"]
    train(compose_config("train", overrides, tmp_path))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step + 1 for e in events.Scalars("val/swd")] == [10]  # epoch 2 of 2; not epoch 1's validation
    assert [e.step + 1 for e in events.Scalars("loss/val")] == [5, 10]
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 10 if monitor == "val/swd" else ckpt["global_step"] in (5, 10)


def test_a_gan_measures_its_sample_metrics_every_n_epochs_and_ranks_its_checkpoints_there(tmp_path):
    """A GAN has no validation: its metrics come after the last batch of every second epoch (10 optimizer steps
    an epoch), not after every epoch, and its best checkpoint is one of those."""
    train(compose_config("train", [*GAN_TINY, "callbacks.metrics.every_n_epochs=2", "trainer.max_steps=40"], tmp_path))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    swd = {e.step: e.value for e in events.Scalars("val/swd")}
    assert sorted(swd) == [20, 40]
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == min(swd, key=swd.get)


def test_sample_metrics_measure_memorisation_against_the_training_images(tmp_path):
    """A "model" whose samples are training images copies all of them; against the validation images (other
    digits) none would look copied."""
    data = DigitsDataModule(image_size=8, channels=1, val_fraction=0.2)
    data.setup("fit")
    copies, _ = data.reference_images("train", 32)
    logged = {}
    model = SimpleNamespace(sample=lambda n, **_: copies[:n], label_indices=lambda *_: None, class_names=[],
                            log_dict=lambda values, **_: logged.update(values))
    trainer = SimpleNamespace(is_global_zero=True, datamodule=data, callbacks=[], global_step=7,
                              strategy=SimpleNamespace(broadcast=lambda values, src: values))
    metrics = SampleMetrics(metrics=["memorisation"], num_samples=32, max_reference=200)
    metrics._measure(trainer, model)
    assert logged["val/memorisation"] == 1.0 and metrics.measured_step == 7
