"""What a run prints: none of Lightning's noise, progress in steps against max_steps, and a summary at the end of a
run and of a sweep."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY, run_script
from test_gan import GAN_TINY

from fiberaug.console import sweep_table

# What Lightning prints on every run, or for a GAN, a small folder, a run limited by steps, and is not the user's.
NOISE = ["litlogger", "LeafSpec", "val_dataloader", "validation_step", "log_every_n_steps", "/-2"]


def test_console_shows_no_noise_steps_against_max_steps_and_ends_with_a_summary(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py", *GAN_TINY, "data=folder", f"data.root={image_folder(broken=False)}", "data.image_size=16",
        "data.batch_size=4", "trainer.log_every_n_steps=50", f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert [text for text in NOISE if text in output] == []
    assert "10/10" in output  # debug=fast: max_steps=10
    summary = output[output.index("run folder:"):]
    assert summary.startswith(f"run folder: {run_dir}\n")
    assert f"last checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}\n" in summary
    assert f"best checkpoint: {run_dir / 'checkpoints'}/best-" in summary and "(val/swd=" in summary
    assert "final metrics: loss/critic=" in summary and "val/swd=" in summary


def _job(sweep: Path, number: int, status: str, value: float | None, *overrides: str) -> None:
    (sweep / str(number)).mkdir(parents=True)
    record = {"overrides": list(overrides), "status": status, "metric": "loss/val" if value is not None else None,
              "value": value}
    (sweep / str(number) / "job.json").write_text(json.dumps(record))


def test_sweep_table_lists_finished_jobs_best_first_then_the_others(tmp_path):
    _job(tmp_path, 0, "finished", 0.5, "seed=1")
    _job(tmp_path, 1, "failed", None, "seed=2")
    _job(tmp_path, 2, "finished", 0.25, "seed=3")
    _job(tmp_path, 10, "running", None, "seed=4")
    lines = sweep_table(tmp_path).splitlines()
    assert lines[0] == f"sweep {tmp_path}: 4 jobs, best (min) first"
    assert lines[1].split() == ["job", "status", "loss/val", "overrides"]
    assert [line.split() for line in lines[2:]] == [
        ["2", "finished", "0.25", "seed=3"], ["0", "finished", "0.5", "seed=1"],
        ["1", "failed", "-", "seed=2"], ["10", "running", "-", "seed=4"],
    ]


def test_sweep_table_ranks_a_metric_to_maximise_highest_first(tmp_path):
    for number, value in enumerate((0.5, 0.75)):
        _job(tmp_path, number, "finished", value, f"seed={number}")
        record = json.loads((tmp_path / str(number) / "job.json").read_text())
        (tmp_path / str(number) / "job.json").write_text(json.dumps({**record, "metric": "val/precision"}))
    assert [line.split()[0] for line in sweep_table(tmp_path).splitlines()[2:]] == ["1", "0"]


def test_a_sweep_ends_with_the_table_of_its_jobs(tmp_path):
    overrides = [*TINY, "trainer.max_steps=2", "trainer.limit_train_batches=2", "optimized_metric=loss/val"]
    result = run_script("train.py", "-m", *overrides, "seed=1,2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index(f"sweep {tmp_path}: 2 jobs, best (min) first"):].splitlines()
    values = {json.loads((tmp_path / job / "job.json").read_text())["value"]: job for job in ("0", "1")}
    rows = [line.split() for line in table[2:4]]
    assert [row[0] for row in rows] == [values[min(values)], values[max(values)]]
    assert [row[1] for row in rows] == ["finished", "finished"] and all(f"seed={int(r[0]) + 1}" in r for r in rows)
