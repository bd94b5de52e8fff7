"""augment.py on small folders: outputs, manifest, modes, seeds, replay, reruns, refusals and broken files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import augment_config, run_script, save
from PIL import Image, ImageFile

from fiberaug.jobs import json_safe
from fiberaug.tasks import run_task
from fiberaug.tasks.augment import augment

RECORD_FIELDS = {"source", "source_sha256", "copy", "seed", "output", "status", "transforms"}
# A user's own transform, as in the README: named by `_target_` in a pipeline file.
VIGNETTE = '''
import albumentations as A
import numpy as np


class Vignette(A.ImageOnlyTransform):
    def __init__(self, strength=(0.2, 0.5), p=0.5):
        super().__init__(p=p)
        self.strength = strength

    def get_params(self):
        return {"strength": self.py_random.uniform(*self.strength)}

    def apply(self, img, strength=0.0, **params):
        h, w = img.shape[:2]
        y, x = np.ogrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
        return (img * (1 - strength * (x**2 + y**2) / 2)[..., None]).astype(img.dtype)
'''


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "manifest.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_script_writes_outputs_manifest_run_file_and_summary(image_folder, tmp_path):
    root, out = image_folder(broken=True), tmp_path / "out"
    result = run_script("augment.py", f"input_dir={root}", f"output_dir={out}", "copies=2", "workers=2")
    assert result.returncode == 1, result.stderr[-3000:]  # broken.png failed, and the exit code says so
    assert "18 written, 0 already done, 2 failed (of 20 outputs)" in result.stdout
    assert "failed cats/broken.png" in result.stdout and "augment" in result.stderr  # summary, progress bar

    lines = records(out)
    assert len(lines) == 20 and all(RECORD_FIELDS <= set(r) for r in lines)
    ok = [r for r in lines if r["status"] == "ok"]
    assert {r["source"] for r in ok} == {"cats/rgb0.png", "cats/rgb1.png", "cats/rgb2.png", "cats/alpha.png",
                                         "dogs/gray0.jpg", "dogs/gray1.jpg", "dogs/gray2.jpg", "dogs/deep16.png",
                                         "dogs/scan.tif"}  # notes.txt ignored
    scans = sorted(r["output"] for r in ok if r["source"] == "dogs/scan.tif")
    assert scans == ["dogs/scan_aug0.tif", "dogs/scan_aug1.tif"]
    assert all((out / r["output"]).is_file() for r in ok)
    assert len({r["seed"] for r in lines}) == 20
    broken = [r for r in lines if r["status"] == "error"]
    assert [r["source"] for r in broken] == ["cats/broken.png"] * 2 and "truncated or damaged PNG" in broken[0]["error"]

    run = json.loads((out / "run.json").read_text())
    assert run["job"]["seed"] == 0 and run["job"]["copies"] == 2 and len(run["job"]["pipeline_sha256"]) == 64
    assert run["pipeline"]["transform"]["transforms"][0]["__class_fullname__"] == "RandomBrightnessContrast"
    assert "augment.py" in run["command"] and run["versions"]["albumentations"] == "2.0.8"
    assert pixels(out / "contact_sheet.png").shape[1] == 3 * 130 + 2  # the original and two copies


def test_contact_sheet_rows_come_from_every_class_under_headers_and_file_names(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):  # the first files are all of class a
        for i in range(3):
            save(root / name / f"{i}.png", np.full((16, 16, 3), colour, np.uint8))
    augment(augment_config(root, out, "copies=2", "augment=none", "contact_sheet=2"))
    sheet = pixels(out / "contact_sheet.png")
    red, blue = (np.all(sheet == colour, axis=2) for colour in ((255, 0, 0), (0, 0, 255)))
    red_rows, blue_rows = np.flatnonzero(red.any(axis=1)), np.flatnonzero(blue.any(axis=1))
    assert len(red_rows) == len(blue_rows) == 128 and red_rows.max() < blue_rows.min()  # a row of each class
    assert red.any(axis=0).sum() == blue.any(axis=0).sum() == 3 * 128  # the original and its two copies
    white = sheet.min(axis=2) > 128
    assert white[: red_rows.min(), 2 * 130 :].any()  # "copy 2" over the last column
    assert white[red_rows.max() + 1 : blue_rows.min()].any()  # the second row's file name above it


def test_records_hold_the_parameters_drawn(image_folder, tmp_path):
    out = tmp_path / "out"
    augment(augment_config(image_folder(broken=False), out, "copies=4", "augment=geometric", "contact_sheet=0"))
    ok = records(out)
    drawn = [t for r in ok for t in r["transforms"]]
    assert {t["name"] for t in drawn} == {"Affine", "Perspective"}
    affine = next(t["params"] for t in drawn if t["name"] == "Affine")
    assert -8 <= affine["rotate"] <= 8 and np.array(affine["matrix"]).shape == (3, 3)
    assert any(not r["transforms"] for r in ok)  # p < 1: some outputs drew nothing


def test_drawn_parameters_are_made_json_safe():
    params = {"matrix": np.eye(3, dtype=np.float32), "noise_map": np.zeros((40, 50, 3), np.float32),
              "scale": {"x": np.float64(0.5)}, "size": (np.int64(3), 4), "gamma": float("nan"), "flag": np.bool_(True)}
    safe = json_safe(params)
    assert json.loads(json.dumps(safe, allow_nan=False)) == {
        "matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "noise_map": {"array_shape": [40, 50, 3], "dtype": "float32"},  # image-sized: the seed redraws it
        "scale": {"x": 0.5}, "size": [3, 4], "gamma": "nan", "flag": True,
    }


def test_modes_formats_and_alpha_are_kept(image_folder, tmp_path):
    root, out = image_folder(broken=False), tmp_path / "out"
    summary = augment(augment_config(root, out, "augment=photometric", "seed=3"))
    assert summary.exit_code == 0 and summary.written == 9
    gray = Image.open(out / "dogs" / "gray0_aug0.jpg")
    assert (gray.format, gray.mode, gray.size) == ("JPEG", "L", (24, 24))
    deep = Image.open(out / "dogs" / "deep16_aug0.png")
    assert deep.mode.startswith("I;16") and pixels(out / "dogs" / "deep16_aug0.png").max() > 255
    assert Image.open(out / "dogs" / "scan_aug0.tif").format == "TIFF"
    rgba = pixels(out / "cats" / "alpha_aug0.png")
    source = pixels(root / "cats" / "alpha.png")
    assert rgba.shape == (16, 16, 4) and np.array_equal(rgba[..., 3], source[..., 3])  # colour transforms skip alpha


def test_alpha_moves_with_the_geometry(tmp_path):
    rgba = np.zeros((8, 12, 4), dtype=np.uint8)
    rgba[:, :3, 3] = 255  # opaque on the left only
    save(tmp_path / "in" / "a.png", rgba)
    flip = "augment={transforms: [{_target_: albumentations.HorizontalFlip, p: 1.0}]}"
    augment(augment_config(tmp_path / "in", tmp_path / "out", flip))
    assert np.array_equal(pixels(tmp_path / "out" / "a_aug0.png")[..., 3], rgba[:, ::-1, 3])


def test_exif_orientation_is_applied_before_augmenting(tmp_path):
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # a viewer turns it 90° clockwise
    (tmp_path / "in").mkdir()
    Image.fromarray(array).save(tmp_path / "in" / "r.png", exif=exif)
    augment(augment_config(tmp_path / "in", tmp_path / "out", "augment=none"))
    upright = pixels(tmp_path / "out" / "r_aug0.png")
    assert upright.shape == (6, 4, 3) and upright[0, -1].tolist() == [255, 255, 255]
    assert not Image.open(tmp_path / "out" / "r_aug0.png").getexif().get(0x0112)


def test_outputs_do_not_depend_on_workers_but_on_the_seed(image_folder, tmp_path):
    root = image_folder(broken=True)
    augment(augment_config(root, tmp_path / "w1", "copies=2", "workers=1"))
    augment(augment_config(root, tmp_path / "w2", "copies=2", "workers=2"))
    augment(augment_config(root, tmp_path / "s1", "copies=2", "seed=1"))
    w1, w2, s1 = snapshot(tmp_path / "w1"), snapshot(tmp_path / "w2"), snapshot(tmp_path / "s1")
    assert w1.keys() == w2.keys() and w1.keys() - {"run.json"} == s1.keys() - {"run.json"}
    assert all(w1[name] == w2[name] for name in w1 if name != "run.json")  # manifest and contact sheet included
    assert sum(w1[name] != s1[name] for name in w1 if name.endswith("_aug0.png")) >= 3


def test_replay_reproduces_every_output_exactly(image_folder, tmp_path):
    root = image_folder(broken=True)
    augment(augment_config(root, tmp_path / "a", "copies=2", "augment=geometric", "seed=5"))
    summary = augment(augment_config(root, tmp_path / "b", f"replay={tmp_path / 'a' / 'manifest.jsonl'}",
                                     "copies=7", "seed=9", "workers=2"))  # a replay takes these from the manifest
    assert summary.exit_code == 0 and summary.written == 18 and not summary.differ
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    images = {name for name in a if name.endswith(("_aug0.png", "_aug1.png", ".jpg", ".tif"))}
    assert len(images) == 18 and all(a[name] == b[name] for name in images)
    assert [r for r in records(tmp_path / "a") if r["status"] == "ok"] == records(tmp_path / "b")
    with pytest.raises(SystemExit, match="is output_dir's own manifest"):
        run_task(augment, augment_config(root, tmp_path / "a", f"replay={tmp_path / 'a' / 'manifest.jsonl'}"))


def test_replay_reports_outputs_that_came_out_different(image_folder, tmp_path):
    root = image_folder(broken=False)
    augment(augment_config(root, tmp_path / "a", "augment=flip"))
    save(root / "cats" / "rgb0.png", np.zeros((20, 30, 3), dtype=np.uint8))  # the source changed since
    summary = augment(augment_config(root, tmp_path / "b", f"replay={tmp_path / 'a' / 'manifest.jsonl'}"))
    assert summary.differ == ["cats/rgb0_aug0.png"] and summary.exit_code == 1


def test_rerun_of_a_finished_job_changes_nothing(image_folder, tmp_path):
    root, out = image_folder(broken=True), tmp_path / "out"
    augment(augment_config(root, out, "copies=2"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    summary = augment(augment_config(root, out, "copies=2"))
    assert (summary.written, summary.skipped, summary.failed) == (0, 18, 2) and summary.exit_code == 1
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


def test_a_failed_source_is_retried_once_it_changes(image_folder, tmp_path):
    root, out = image_folder(broken=True), tmp_path / "out"
    assert augment(augment_config(root, out)).failed == 1
    save(root / "cats" / "broken.png", np.full((5, 5, 3), 9, dtype=np.uint8))
    summary = augment(augment_config(root, out))
    assert (summary.written, summary.failed, summary.exit_code) == (1, 0, 0)
    assert [r["status"] for r in records(out) if r["source"] == "cats/broken.png"] == ["error", "ok"]


def test_another_job_is_refused_unless_overwrite(image_folder, tmp_path):
    root, out = image_folder(broken=False), tmp_path / "out"
    augment(augment_config(root, out, "copies=2"))
    (out / "mine.txt").write_text("not from augment.py")
    for change, key in (("copies=1", "copies"), ("seed=1", "seed"), ("augment=flip", "pipeline_sha256")):
        with pytest.raises(SystemExit, match=f"holds another job \\(its run.json differs in: {key}\\)"):
            run_task(augment, augment_config(root, out, "copies=2", change))
    augment(augment_config(root, out, "copies=1", "overwrite=true"))
    assert not list(out.rglob("*_aug1.*")) and len(list(out.rglob("*_aug0.*"))) == 9
    assert (out / "mine.txt").read_text() == "not from augment.py"  # only the old job's own files are removed
    assert json.loads((out / "run.json").read_text())["job"]["copies"] == 1


@pytest.mark.parametrize(
    ("input_dir", "output_dir", "message"),
    [
        ("in", "in", "is inside input_dir"),
        ("in", "in/aug", "is inside input_dir"),
        ("in/sub", "in", "contains input_dir"),
        ("in", "full", "is not empty and holds no augment job"),
        ("missing", "out", "input_dir=.*missing is not a folder"),
    ],
)
def test_refused_folders(tmp_path, input_dir, output_dir, message):
    save(tmp_path / "in" / "sub" / "a.png", np.zeros((4, 4, 3), dtype=np.uint8))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.pdf").write_bytes(b"%PDF")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit, match=message):
        run_task(augment, augment_config(tmp_path / input_dir, tmp_path / output_dir))
    assert snapshot(tmp_path) == before and not (tmp_path / "in" / "aug").exists()


def test_bad_options_are_one_line_errors(image_folder, tmp_path):
    root = image_folder(broken=False)
    with pytest.raises(SystemExit, match=r"augment=nosuch: not a pipeline of conf/augment/ \(flip, geometric, none"):
        run_task(augment, augment_config(root, tmp_path / "out", "augment=nosuch"))
    with pytest.raises(SystemExit, match="copies=0 must be an integer from 1 up"):
        run_task(augment, augment_config(root, tmp_path / "out", "copies=0"))


def test_each_kind_of_broken_file_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a decoder that pads truncated files with grey
    root = tmp_path / "in"
    photo = save(root / "good.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).read_bytes()
    png = save(root / "good.png", np.zeros((32, 32, 3), dtype=np.uint8)).read_bytes()
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("hello")
    (root / "cut.jpg").write_bytes(photo[: len(photo) // 2])
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "readme.md").write_text("ignored: not an image extension")
    summary = augment(augment_config(root, tmp_path / "out", "augment=flip"))
    reasons = {r["source"]: r.get("error", "") for r in records(tmp_path / "out")}
    assert set(reasons) == {"good.jpg", "good.png", "empty.png", "text.jpg", "cut.jpg", "cut.png"}
    assert reasons["good.jpg"] == reasons["good.png"] == ""
    assert "empty file" in reasons["empty.png"] and "cannot identify image" in reasons["text.jpg"]
    assert "truncated or damaged JPEG" in reasons["cut.jpg"] and "truncated or damaged PNG" in reasons["cut.png"]
    assert (summary.written, summary.failed, summary.exit_code) == (2, 4, 1)
    assert sorted(p.name for p in (tmp_path / "out").glob("*_aug0.*")) == ["good_aug0.jpg", "good_aug0.png"]


def test_a_users_own_transform_by_target(tmp_path, monkeypatch, image_folder):
    (tmp_path / "my_transforms.py").write_text(VIGNETTE)
    monkeypatch.syspath_prepend(str(tmp_path))
    pipeline = tmp_path / "vignette.yaml"
    pipeline.write_text("transforms:\n  - _target_: my_transforms.Vignette\n    strength: [0.3, 0.4]\n    p: 1.0\n")
    root, out = image_folder(broken=False), tmp_path / "out"
    augment(augment_config(root, out, f"augment={pipeline}", "workers=2"))
    (drawn,) = next(r for r in records(out) if r["source"] == "cats/rgb0.png")["transforms"]
    assert drawn["name"] == "Vignette" and 0.3 <= drawn["params"]["strength"] <= 0.4
    corner, source = pixels(out / "cats" / "rgb0_aug0.png")[0, 0], pixels(root / "cats" / "rgb0.png")[0, 0]
    assert (corner <= source).all() and (corner < source).any()
