"""benchmarks/utility.py's pieces on a tiny budget: what each generator saw, and the real images of every arm."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from fiberaug.data import DigitsDataModule
from fiberaug.models import read_checkpoint
from fiberaug.tasks.train import train

TINY = {
    "ddpm": ["model.denoiser.base_channels=8", "model.denoiser.channel_mults=[1,2]", "model.sampling.steps=2"],
    "gan": ["model.generator.base_channels=8", "model.discriminator.base_channels=8", "model.latent_dim=8"],
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("utility_benchmark", ROOT / "benchmarks" / "utility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(bench, kind: str, draw: int, folder) -> object:
    overrides = [*bench.generator_overrides(kind, 3, draw, 4), *TINY[kind], "data.image_size=16",
                 "data.batch_size=16", "data.num_workers=0"]
    train(compose_config("train", overrides, folder))
    return folder / "checkpoints" / "last.ckpt"


def test_generators_see_exactly_the_draw_and_every_arm_the_same_real_images(bench, tmp_path, monkeypatch):
    ckpts = {kind: _train(bench, kind, 1, tmp_path / kind) for kind in ("ddpm", "gan")}
    draw = DigitsDataModule(image_size=16, channels=1, val_fraction=0.2, train_per_class=3, subset_seed=1)
    draw.setup()
    drawn = {draw.item_id(item) for item in draw.train_set.items}
    held = {draw.item_id(item) for item in draw.val_set.items}
    for ckpt in ckpts.values():
        seen = set(read_checkpoint(ckpt)["fiberaug"]["data"]["train"])
        assert seen == drawn and not seen & held  # the draw exactly, and never a test digit (by content)

    calls = []
    measured_arm = bench.arm_accuracy

    def spy(condition, real, synthetic, held_out, classes, **options):
        calls.append((condition, real, synthetic[1], held_out))
        return measured_arm(condition, real, synthetic, held_out, classes, **options)

    monkeypatch.setattr(bench, "arm_accuracy", spy)
    options = OmegaConf.create({"steps": 3, "batch_size": 8, "lr": 1e-3})
    augment = OmegaConf.load(ROOT / "conf" / "augment" / "geometric.yaml")
    result = bench.measure_draw(ckpts, [1, 2], options, augment, classifier_seeds=[0])

    expected, labels = draw.reference_images("train")
    held_images, _ = draw.reference_images("val")
    assert len(calls) == 2 + 2 * 2 * 2  # the real arms once; per generator and ratio, the two synthetic arms
    for condition, real, synthetic_labels, held_out in calls:
        assert torch.equal(real[0], expected) and real[1].tolist() == labels, condition
        assert torch.equal(held_out[0], held_images)
        counts = torch.bincount(synthetic_labels, minlength=10).tolist()
        assert counts in ([0] * 10, [3] * 10, [6] * 10) and (counts == [0] * 10) == (condition in bench.REAL_ARMS)
    assert result["real_images"] == 30 and result["held_out"] == len(held)
    assert all(0 <= row["memorisation"] <= 1 for row in result["generators"].values())

    other = _train(bench, "gan", 2, tmp_path / "other-draw")
    with pytest.raises(SystemExit, match="was trained on other images than"):
        bench.measure_draw({"ddpm": ckpts["ddpm"], "gan": other}, [1], options, augment, classifier_seeds=[0])


def test_verdict_says_plainly_when_synthetic_images_do_not_help(bench):
    row = {"shots": 5, "generator": "gan", "ratio": 1, "memorisation": (0.0, 0.0), "real": (0.80, 0.02),
           "real + classical": (0.85, 0.03), "real + synthetic": (0.86, 0.02), "real + classical + synthetic":
           (0.84, 0.01)}
    words = bench.verdict([row, {**row, "ratio": 5, "real + synthetic": (0.90, 0.01)}])
    assert words[0].startswith("Synthetic images helped in 1 of 4 settings; most: N=5, gan, 5x")
    assert "ratio that helped most is 5x" in words[1]
    words = bench.verdict([row])
    assert words[0].startswith("Synthetic images did not beat the better of real and real + classical by more than "
                               "one standard deviation at any N. Closest: N=5, gan, 1x synthetic, real + synthetic, "
                               "+0.010 against real + classical (sd 0.030).")
