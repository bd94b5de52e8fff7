"""Errors in the user's input: one line naming the key or file, its value and what is accepted, and no run folder
left behind by a run refused before it wrote anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, run_script, save
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from fiberaug.errors import UserError
from fiberaug.tasks import run_task
from fiberaug.tasks.sample import sample
from fiberaug.tasks.train import train


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be an integer (-1: no limit)"),
        (["trainer.limit_val_batches=[1]"], "trainer.limit_val_batches=[1] must be an integer or a number or null"),
        (["trainer.precision=17"], "trainer.precision=17 must be one of 64, 32, 16, "),
        (["+trainer.max_step=5"], "trainer.max_step is not an option of Lightning's Trainer; did you mean "
                                  "trainer.max_steps"),
        (["trainer=gpu"], "trainer=gpu (trainer.accelerator=gpu): no CUDA GPU here; use trainer=cpu, or "
                          "trainer=default"),
        # What Lightning itself refuses is one line too.
        (["trainer.accelerator=cpu", "trainer.devices=0"],
         "trainer: Lightning refuses this configuration: `Trainer(devices=0)` value is not a valid input using cpu"),
    ],
)
def test_a_trainer_option_lightning_cannot_take_is_one_line_naming_it(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_config("train", [*TINY, *overrides], tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_task(train, cfg)
    assert str(exc.value).startswith(f"error: {message}")
    assert "\n" not in str(exc.value)


def test_a_file_that_is_not_a_checkpoint_names_it_and_what_is_accepted(tmp_path):
    png = save(tmp_path / "photo.png", np.zeros((8, 8, 3), dtype=np.uint8))
    cfg = compose_config("sample", [f"ckpt_path={png}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as exc:
        run_task(sample, cfg)
    message = str(exc.value)
    assert message.startswith(f"error: ckpt_path={png} is not a FiberAug checkpoint (a .ckpt written by train.py) "
                              "or export folder")
    assert "\n" not in message and "weights_only" not in message and "file an issue" not in message


def test_resuming_from_a_file_that_is_not_a_checkpoint_names_it(tmp_path):
    png = save(tmp_path / "photo.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(SystemExit) as exc:
        run_task(train, compose_config("train", [*TINY, f"ckpt_path={png}"], tmp_path / "run"))
    message = str(exc.value)
    assert message.startswith(f"error: ckpt_path={png} is not a checkpoint torch can read (")
    assert "\n" not in message and "weights_only" not in message


def test_a_run_refused_before_it_wrote_anything_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "runs" / "refused"
    result = run_script("train.py", *TINY, "trainer.max_steps=abc", f"hydra.run.dir={run_dir}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: trainer.max_steps='abc' must be an integer (-1: no limit)"
    assert (tmp_path / "runs").is_dir() and not run_dir.exists()


def _hydra_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run folder as Hydra leaves it before the task starts: `.hydra/` and the log; HydraConfig pointing at it
    for this test only."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    cfg = compose_config("train", [f"hydra.run.dir={run_dir}"])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig().set_config(cfg)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        (run_dir / ".hydra" / name).write_text("x: 1\n")
    (run_dir / "train.log").write_text("")
    return run_dir


def _refused(cfg: object) -> None:
    raise UserError("refused")


def test_a_refused_run_removes_only_hydras_own_files(tmp_path, monkeypatch):
    run_dir = _hydra_run(tmp_path, monkeypatch)
    with pytest.raises(SystemExit, match="error: refused"):
        run_task(_refused, None)
    assert not run_dir.exists() and tmp_path.is_dir()


@pytest.mark.parametrize("extra", ["notes.txt", ".hydra/mine.yaml", "checkpoints/"])
def test_a_refused_run_keeps_a_folder_holding_anything_else_whole(tmp_path, monkeypatch, extra):
    run_dir = _hydra_run(tmp_path, monkeypatch)
    before = {p.relative_to(run_dir) for p in run_dir.rglob("*")}
    (run_dir / extra).mkdir() if extra.endswith("/") else (run_dir / extra).write_text("keep")
    with pytest.raises(SystemExit, match="error: refused"):
        run_task(_refused, None)
    assert before <= {p.relative_to(run_dir) for p in run_dir.rglob("*")}
    assert (run_dir / extra).exists()


def test_a_refused_run_keeps_the_folder_it_runs_in(tmp_path, monkeypatch):
    run_dir = _hydra_run(tmp_path, monkeypatch)
    monkeypatch.chdir(run_dir)
    with pytest.raises(SystemExit, match="error: refused"):
        run_task(_refused, None)
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
