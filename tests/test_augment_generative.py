"""augment.py with a generative first step (img2img, ControlNet) on a tiny Stable Diffusion the tests build: every
draw recorded, replayed byte for byte, resumed after kill -9; masks kept through it; drifted variants dropped."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import HANG_GUARD, ROOT, augment_config, save, tiny_stable_diffusion
from PIL import Image

from fiberaug.augment.generative import edge_iou
from fiberaug.errors import UserError
from fiberaug.tasks.augment import augment


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Stable Diffusion pipeline and a ControlNet made from its UNet."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("sd")
    pipeline = tiny_stable_diffusion(tmp)
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8)).save_pretrained(tmp / "controlnet")
    return pipeline, tmp / "controlnet"


def photos(root: Path, count: int = 3) -> Path:
    """Photos of panels (bright rectangles on dark) of 20×28 px, their masks, a caption for one, a broken file."""
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 40, (20, 28, 3), dtype=np.uint8)
        image[4:16, 3 + i : 12 + i] = 220
        save(root / "in" / "panel" / f"{i}.png", image)
        save(root / "masks" / "panel" / f"{i}.png", (image[..., 0] > 127).astype(np.uint8))
    (root / "in" / "panel" / "0.txt").write_text("a dusty panel with yellow cables")
    (root / "in" / "panel" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return root / "in"


def pipeline_file(path: Path, generative: dict, transforms: list | None = None) -> Path:
    path.write_text(yaml.safe_dump({"generative": generative, "transforms": transforms or []}))
    return path


def records(output_dir: Path) -> dict[str, dict]:
    lines = (output_dir / "manifest.jsonl").read_text().splitlines()
    return {r["output"]: r for r in map(json.loads, lines)}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def img2img(pipeline: Path, **extra) -> dict:
    return {"kind": "img2img", "pipeline": str(pipeline), "strength": [0.5, 1.0], "steps": 4, "guidance_scale": 3.0,
            "prompt": "a photo of a {class}", "max_side": 16, **extra}


def test_img2img_variants_are_recorded_keep_masks_and_replay_byte_for_byte(models, tmp_path):
    pipeline, _ = models
    source = photos(tmp_path)
    spec = pipeline_file(tmp_path / "gen.yaml", img2img(pipeline),
                         [{"_target_": "albumentations.HorizontalFlip", "p": 1.0}])
    out = tmp_path / "out"
    summary = augment(augment_config(source, out, f"augment={spec}", "copies=2", "workers=2",
                                     f"mask_dir={tmp_path / 'masks'}"))
    assert (summary.written, summary.failed) == (6, 2)  # the broken file: recorded for each copy, not fatal
    made = records(out)
    assert made["panel/broken_aug0.png"]["status"] == "error"
    unet_weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    for i in range(3):
        for k in range(2):
            record = made[f"panel/{i}_aug{k}.png"]
            drawn = record["generative"]
            assert drawn["prompt"] == ("a dusty panel with yellow cables" if i == 0 else "a photo of a panel")
            assert drawn["strength"] in (0.5, 1.0) and drawn["steps"] == 4 and drawn["guidance_scale"] == 3.0
            assert drawn["scheduler"] == "DDIMScheduler" and drawn["size"] == [16, 8]
            assert drawn["models"][str(unet_weights)] == hashlib.sha256(unet_weights.read_bytes()).hexdigest()
            assert 0 <= drawn["edge_iou"] < 1  # a random-weight model keeps little of the layout
            assert [t["name"] for t in record["transforms"]][-1] == "HorizontalFlip"
            image = np.asarray(Image.open(out / record["output"]))
            original = np.asarray(Image.open(source / record["source"]))
            assert image.shape == original.shape and not np.array_equal(image, original[:, ::-1])
            # The generative step keeps the geometry: the mask is the source's, moved by the classical flip alone.
            mask = np.asarray(Image.open(out / record["annotations"]["mask"]))
            assert np.array_equal(mask, np.asarray(Image.open(tmp_path / "masks" / record["source"]))[:, ::-1])
    assert json.loads((out / "run.json").read_text())["job"]["generative"]["models"][str(unet_weights)]

    replayed = augment(augment_config(source, tmp_path / "replayed", f"replay={out / 'manifest.jsonl'}",
                                      f"mask_dir={tmp_path / 'masks'}"))
    assert replayed.written == 6 and not replayed.differ
    assert all(snapshot(tmp_path / "replayed")[name] == data for name, data in snapshot(out).items()
               if name.endswith(".png") and "contact" not in name)


def test_controlnet_variants_from_canny_edges_and_from_control_maps(models, tmp_path):
    pipeline, controlnet = models
    source = photos(tmp_path, count=2)
    (source / "panel" / "broken.png").unlink()
    generative = {"kind": "controlnet", "pipeline": str(pipeline), "controlnet": str(controlnet), "steps": 3,
                  "canny": [50, 150], "max_side": 16}
    out = tmp_path / "out"
    spec = pipeline_file(tmp_path / "c.yaml", generative)
    assert augment(augment_config(source, out, f"augment={spec}")).written == 2
    drawn = records(out)["panel/1_aug0.png"]["generative"]
    assert drawn["kind"] == "controlnet" and drawn["control"] == {"canny": [50, 150]}
    assert any(path.startswith(str(controlnet)) for path in drawn["models"])

    maps = tmp_path / "maps"
    save(maps / "panel" / "0.jpg", np.zeros((20, 28), dtype=np.uint8))
    spec = pipeline_file(tmp_path / "m.yaml", {**generative, "control_dir": str(maps)})
    with pytest.raises(UserError, match=r"generative.control_dir=.*maps has no control map for panel/1.png"):
        augment(augment_config(source, tmp_path / "out2", f"augment={spec}"))


def test_drifted_variants_are_dropped_and_recorded(models, tmp_path):
    pipeline, _ = models
    source = photos(tmp_path, count=2)
    spec = pipeline_file(tmp_path / "gen.yaml", img2img(pipeline, strength=1.0, min_edge_iou=0.99))
    summary = augment(augment_config(source, tmp_path / "out", f"augment={spec}"))
    made = records(tmp_path / "out")
    assert summary.dropped == 2 and summary.written == 0
    assert made["panel/0_aug0.png"]["status"] == "dropped"
    assert "< min_edge_iou 0.99" in made["panel/0_aug0.png"]["error"]
    assert not (tmp_path / "out" / "panel" / "0_aug0.png").exists()


def test_edge_iou_is_one_for_the_same_layout_and_lower_for_a_changed_one():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
    image[8:24, 8:20] = 220
    assert edge_iou(image, image) == 1.0
    recoloured = image.copy()
    recoloured[8:24, 8:20] = [200, 40, 40]  # a new colour, the same layout
    assert edge_iou(image, recoloured) > 0.9
    moved = np.roll(image, 6, axis=1)
    assert edge_iou(image, moved) < 0.5


def test_a_missing_model_folder_is_a_one_line_error_naming_it(tmp_path):
    source = photos(tmp_path, count=1)
    spec = pipeline_file(tmp_path / "gen.yaml", img2img(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"generative.pipeline=.*nowhere is not a folder"):
        augment(augment_config(source, tmp_path / "out", f"augment={spec}"))


def test_a_killed_generative_run_then_the_same_command_ends_as_one_clean_run(models, tmp_path, monkeypatch):
    pipeline, _ = models
    source = photos(tmp_path, count=6)
    (source / "panel" / "broken.png").unlink()
    spec = pipeline_file(tmp_path / "gen.yaml", img2img(pipeline, steps=8))
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "augment.py"), f"input_dir={source}", f"output_dir={out}",
               f"augment={spec}", "copies=2"]
    run = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest, deadline = out / "manifest.jsonl", time.monotonic() + HANG_GUARD
    while not (manifest.is_file() and manifest.read_bytes().count(b"\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert 3 <= manifest.read_bytes().count(b"\n") < 12, "the run was not killed part-way"
    assert augment(augment_config(source, out, f"augment={spec}", "copies=2")).skipped >= 3  # the same command
    augment(augment_config(source, tmp_path / "clean", f"augment={spec}", "copies=2"))
    resumed, clean = snapshot(out), snapshot(tmp_path / "clean")
    resumed.pop("run.json"), clean.pop("run.json")
    assert resumed.keys() == clean.keys() and all(resumed[name] == clean[name] for name in clean)


def test_training_refuses_a_pipeline_with_a_generative_step():
    from fiberaug.data.pipelines import sized_pipeline

    with pytest.raises(UserError, match="generative step, which runs in augment.py only"):
        sized_pipeline(16, augment={"generative": {"pipeline": "sd"}, "transforms": []})
