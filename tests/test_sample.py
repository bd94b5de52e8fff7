"""sample.py on a trained checkpoint: files, determinism, labels, samplers and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_script
from PIL import Image

from fiberaug.models import load_generator
from fiberaug.tasks import run_task
from fiberaug.tasks.sample import sample


def _sample(ckpt: Path, out: Path, *overrides: str) -> Path:
    cfg = compose_config("sample", [f"ckpt_path={ckpt}", f"output_dir={out}", *overrides])
    return sample(cfg)


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_sample_script_writes_pngs_and_a_grid(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result = run_script("sample.py", f"ckpt_path={ckpt}", "num_samples=5", "steps=3", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["00000_0.png", "00001_1.png", "00002_2.png", "00003_3.png", "00004_4.png", "grid.png"]
    first = np.asarray(Image.open(tmp_path / "00000_0.png"))
    assert first.shape == (8, 8)  # the trained size, grayscale
    # The grid: one column per class drawn (0 to 4), each sample enlarged ×8 under a band with the class names.
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    header = grid.shape[0] - (64 + 4)
    assert grid.shape[1] == 5 * 66 + 2 and header >= 14 and grid[:header].max() > 128
    assert np.array_equal(grid[header + 2 : header + 66, 2:66], np.kron(first, np.ones((8, 8), np.uint8)))
    assert "sampling" in result.stderr  # the progress bar


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
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000_7.png", "00001_3.png", "00002_7.png", "00003_3.png"]


def test_guidance_scale_reaches_the_sampler(trained_run, tmp_path, monkeypatch):
    """A 10-step model's samples saturate at ±1, which hides guidance; the scale handed on is checked instead."""
    import fiberaug.models.diffusion as diffusion
    from fiberaug.diffusion import guided

    scales = []

    def recording(net, labels, null_label, guidance_scale):
        scales.append(guidance_scale)
        return guided(net, labels, null_label, guidance_scale)

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


def test_existing_samples_are_not_overwritten(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    _sample(ckpt, tmp_path, "num_samples=1", "steps=1")
    cfg = compose_config("sample", [f"ckpt_path={ckpt}", f"output_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="already holds samples"):
        run_task(sample, cfg)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "model.ckpt").write_text("hello")
    cfg = compose_config("sample", [f"ckpt_path={tmp_path / 'model.ckpt'}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match=r"is not a FiberAug checkpoint \(a \.ckpt written by train\.py\) or export"):
        run_task(sample, cfg)
