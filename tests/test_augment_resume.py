"""A run killed at any moment, then run again, ends exactly as one uninterrupted run, with no partial files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD, ROOT, augment_config, save

from fiberaug.files import locked_folder
from fiberaug.tasks import run_task
from fiberaug.tasks.augment import augment

# A transform slow enough that a run can be killed in the middle.
SLOW = '''
import time
import albumentations as A


class Slow(A.ImageOnlyTransform):
    def apply(self, img, **params):
        time.sleep(0.05)
        return 255 - img
'''


def folder(root: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        save(root / f"g{i % 3}" / f"{i:02d}.png", rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def latest(output_dir: Path) -> dict[str, dict]:
    lines = (output_dir / "manifest.jsonl").read_text().splitlines()
    return {record["output"]: record for record in map(json.loads, lines)}


def test_killed_run_then_rerun_equals_a_clean_run(tmp_path, monkeypatch):
    (tmp_path / "slow_transform.py").write_text(SLOW)
    pipeline = tmp_path / "slow.yaml"
    pipeline.write_text("transforms: [{_target_: slow_transform.Slow, p: 1}, {_target_: albumentations.VerticalFlip}]")
    root, out = folder(tmp_path / "in", 24), tmp_path / "out"
    command = [sys.executable, str(ROOT / "augment.py"), f"input_dir={root}", f"output_dir={out}",
               f"augment={pipeline}", "copies=2", "workers=2"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    run = subprocess.Popen(command, env=env, start_new_session=True, **quiet)
    manifest, deadline = out / "manifest.jsonl", time.monotonic() + 120
    while not (manifest.is_file() and manifest.read_bytes().count(b"\n") >= 6) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(run.pid, signal.SIGKILL)  # the whole process group: parent and workers, mid-write or not
    run.wait()
    assert 6 <= manifest.read_bytes().count(b"\n") < 48, "the run was not killed part-way"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already done" in rerun.stdout

    monkeypatch.syspath_prepend(str(tmp_path))
    augment(augment_config(root, tmp_path / "clean", f"augment={pipeline}", "copies=2", "workers=2"))
    resumed, clean = snapshot(out), snapshot(tmp_path / "clean")
    resumed.pop("run.json"), clean.pop("run.json")  # they differ only in the command line that made them
    assert resumed.keys() == clean.keys() and len(resumed) == 48 + 2  # outputs, manifest, contact sheet; no temp files
    assert all(resumed[name] == clean[name] for name in clean)


def test_torn_manifest_line_stray_temp_files_and_lost_outputs_are_repaired(tmp_path):
    root = folder(tmp_path / "in", 6)
    augment(augment_config(root, tmp_path / "clean", "augment=flip", "copies=2"))
    out = tmp_path / "out"
    augment(augment_config(root, out, "augment=flip", "copies=2"))
    manifest = out / "manifest.jsonl"
    manifest.write_bytes(manifest.read_bytes()[:-40])  # killed while writing the last line
    (out / "g1" / ".01_aug0.png.4242.fiberaug-tmp").write_bytes(b"half an image")
    (out / "g2" / "02_aug1.png").unlink()  # recorded, then lost
    summary = augment(augment_config(root, out, "augment=flip", "copies=2"))
    assert (summary.written, summary.skipped) == (2, 10)
    repaired, clean = snapshot(out), snapshot(tmp_path / "clean")
    del repaired["manifest.jsonl"], clean["manifest.jsonl"]
    assert repaired == clean  # no temporary file left, the lost output made again
    assert latest(out) == latest(tmp_path / "clean")  # the remade output has a second line, the last one counts


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    root, out = folder(tmp_path / "in", 2), tmp_path / "out"
    out.mkdir()
    with locked_folder(out), pytest.raises(SystemExit, match="is being written by another run"):
        run_task(augment, augment_config(root, out))
