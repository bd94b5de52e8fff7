"""Sweeps and resuming at every scale: Optuna studies, launchers, interrupted sweeps, ckpt_path=last, and the
optimized_metric that train.py returns."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import HANG_GUARD, PROBES, TINY, compose_config, run_script
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fiberaug.runs import Run
from fiberaug.tasks import run_task
from fiberaug.tasks.train import train

# Two epochs of two steps, each validated: a checkpoint at step 2, the end at step 4.
SHORT = [*TINY, "trainer.max_steps=4", "trainer.limit_train_batches=2"]


def _kill(marker: Path, job: int) -> list[str]:
    """Kill the sweep with SIGKILL at step 3 of job `job`, the first time only."""
    return [
        "+callbacks.kill._target_=probes.KillOnce", f"+callbacks.kill.marker={marker}", f"+callbacks.kill.job={job}",
        "+callbacks.kill.step=3",
    ]


def _record(job_dir: Path) -> dict:
    return json.loads((job_dir / "job.json").read_text())


def _train_steps(events_file: Path) -> list[int]:
    events = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars("loss/train")]


def _global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def test_an_interrupted_sweep_run_again_skips_its_finished_job_and_resumes_the_other(tmp_path):
    command = ["-m", *SHORT, "seed=1,2", "optimized_metric=loss/val", *_kill(tmp_path / "killed", job=1)]
    command.append(f"paths.log_dir={tmp_path}")  # no hydra.sweep.dir: the same command must find its sweep again
    first = run_script("train.py", *command, env=PROBES)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    finished, killed = sweep / "0", sweep / "1"
    assert _record(finished)["status"] == "finished" and _record(killed)["status"] == "running"
    # Each job's TensorBoard run is named by what it changed (seed), not by the overrides the sweep's jobs share.
    before = _record(finished), sorted((finished / "tensorboard" / "seed=1").iterdir())

    second = run_script("train.py", *command, env=PROBES)
    assert second.returncode == 0, second.stderr[-3000:]
    assert list((tmp_path / "train" / "multiruns").iterdir()) == [sweep]
    assert (_record(finished), sorted((finished / "tensorboard" / "seed=1").iterdir())) == before  # not trained again
    record = _record(killed)
    assert record["status"] == "finished" and record["resumed_from"] == str(killed / "checkpoints" / "last.ckpt")
    assert _global_step(killed / "checkpoints" / "last.ckpt") == 4
    first_events, resumed_events = sorted((killed / "tensorboard" / "seed=2").glob("events.*"),
                                         key=os.path.getmtime)
    # The killed run's last events may be lost with it; the resumed one goes on from the checkpoint at step 2.
    resumed_steps = _train_steps(resumed_events)
    assert _train_steps(first_events)[0] == 0 and len(resumed_steps) == 2 and min(resumed_steps) >= 2


def test_an_optuna_study_runs_its_trials_and_an_interrupted_one_continues_from_its_storage(tmp_path):
    sweep = tmp_path / "study"
    command = [
        "-m", "hparams_search=ddpm", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1", *SHORT,
        *_kill(tmp_path / "killed", job=1), f"hydra.sweep.dir={sweep}",
    ]
    first = run_script("train.py", *command, env=PROBES)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    storage = f"sqlite:///{sweep}/optuna.db"
    trials = optuna.load_study(study_name="ddpm", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING"]

    second = run_script("train.py", *command, env=PROBES)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="ddpm", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # the interrupted trial ran again, no new one
    for trial in trials:
        record = _record(sweep / str(trial.number))
        assert f"model.lr={trial.params['model.lr']}" in record["overrides"] and record["value"] == trial.value
    assert _record(sweep / "1")["resumed_from"] == str(sweep / "1" / "checkpoints" / "last.ckpt")
    best = min(trials, key=lambda t: t.value)
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_value == best.value
    assert f"Best value: {best.value}" in second.stdout + second.stderr


def test_submitit_local_runs_each_job_of_a_sweep_in_its_own_process(tmp_path):
    overrides = [*TINY, "trainer.max_steps=2", "trainer.limit_train_batches=2", "optimized_metric=loss/val"]
    result = run_script("train.py", "-m", "hydra/launcher=submitit_local", *overrides, "seed=1,2",
                        f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    # Each job's process finds the sweep's folder, named in the submitting process.
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    results = sorted((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len({path.parent.name for path in results}) == 2  # two submitit jobs, each a process
    returned = sorted(pickle.loads(path.read_bytes())[1].return_value for path in results)
    assert returned == sorted(_record(sweep / job)["value"] for job in ("0", "1"))


def test_ckpt_path_last_resumes_the_newest_run_with_the_same_overrides(tmp_path):
    runs = tmp_path / "train" / "runs"
    overrides = [*TINY, "trainer.max_steps=5"]
    train(compose_config("train", [*TINY, "trainer.max_steps=3"], runs / "a"))
    # Copies of its folder stand in for runs of `overrides` interrupted at step 3, and one of other overrides.
    for name, extra, age in (("older", [], 200), ("newer", [], 100), ("other", ["seed=7"], 0)):
        shutil.copytree(runs / "a", runs / name)
        record = _record(runs / name) | {"overrides": sorted([*overrides, *extra])}
        (runs / name / "job.json").write_text(json.dumps(record))
        stamp = (runs / name / "checkpoints" / "last.ckpt").stat().st_mtime - age
        os.utime(runs / name / "checkpoints" / "last.ckpt", (stamp, stamp))

    cfg = compose_config("train", [*overrides, "ckpt_path=last"], runs / "resumed")
    cfg.paths.log_dir = str(tmp_path)  # where ckpt_path=last looks: <log_dir>/train/runs/
    train(cfg)
    assert _record(runs / "resumed")["resumed_from"] == str(runs / "newer" / "checkpoints" / "last.ckpt")
    (events,) = (runs / "resumed" / "tensorboard").glob("events.*")
    assert _train_steps(events) == [3, 4] and _global_step(runs / "resumed" / "checkpoints" / "last.ckpt") == 5
    cfg = compose_config("train", [*overrides, "seed=99", "ckpt_path=last"], runs / "none")
    cfg.paths.log_dir = str(tmp_path)
    with pytest.raises(SystemExit, match=f"ckpt_path=last: no run with the same overrides .* has {runs}/"):
        run_task(train, cfg)


def test_an_optimized_metric_nothing_logs_is_refused_before_training(tmp_path):
    cfg = compose_config("train", [*TINY, "optimized_metric=val/nope"], tmp_path)
    with pytest.raises(SystemExit, match="optimized_metric=val/nope is not logged by this run, which logs: "
                                         "loss/train, loss/val"):
        run_task(train, cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_a_run_stopped_inside_an_epoch_still_validates_at_its_last_step(tmp_path):
    """Two steps of a five-step epoch: Lightning alone would not validate, so a sweep would have no loss/val."""
    value = train(compose_config("train", [*TINY, "trainer.max_steps=2", "optimized_metric=loss/val"], tmp_path))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/val")] == [(1, pytest.approx(value))]
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    assert _global_step(best) == 2 and _record(tmp_path)["status"] == "finished"


def test_an_optimized_metric_never_logged_fails_after_training(tmp_path):
    overrides = [*TINY, "trainer.max_steps=2", "optimized_metric=val/swd", "callbacks.metrics.every_n_epochs=5"]
    with pytest.raises(SystemExit, match="optimized_metric=val/swd was never logged in this run"):
        run_task(train, compose_config("train", overrides, tmp_path))  # measured every 5 epochs: never here
    record = _record(tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and record["status"] == "failed"
    assert record["value"] is None and "val/swd was never logged" in record["error"]


def test_a_sweep_job_without_its_metric_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
    one_epoch = [*TINY, "trainer.max_steps=2", "trainer.limit_train_batches=2"]
    result = run_script("train.py", "-m", *one_epoch, "callbacks.metrics.every_n_epochs=5,1",
                        "optimized_metric=val/swd", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    failed, finished = _record(tmp_path / "0"), _record(tmp_path / "1")
    assert failed["status"] == "failed" and "val/swd was never logged" in failed["error"]
    assert finished["status"] == "finished" and finished["value"] > 0


def test_ddp_that_would_run_the_sweep_again_is_refused_in_a_sweep_job(tmp_path):
    cfg = compose_config("train", [*TINY, "trainer=ddp_cpu", "hydra.mode=MULTIRUN"], tmp_path)
    with pytest.raises(SystemExit, match="DDP inside a -m sweep: Lightning would start each further process by "
                                         "running the whole sweep again"):
        run_task(train, cfg)


# A sweep app as small as a Hydra app gets, with FiberAug's own job records: it refuses a folder holding another
# job (Run.sweep_state), and a job it finds finished returns that result, as train.py does.
_APP = '''
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from fiberaug.runs import Run, identifying
from fiberaug.runs import Run
from fiberaug.tasks import run_task


def job(cfg):
    run = Run(Path(HydraConfig.get().runtime.output_dir), identifying(HydraConfig.get().overrides.task))
    finished, _ = run.sweep_state()
    if finished is None:
        run.write("finished", metric="x", value=(cfg.x - 0.3) ** 2, job=HydraConfig.get().job.num)
    return run.record()["value"]


@hydra.main(version_base="1.3", config_path=".", config_name="app")
def main(cfg):
    return run_task(job, cfg)


if __name__ == "__main__":
    main()
'''
_APP_CONFIG = """
defaults:
  - override hydra/sweeper: resumable_optuna
x: 0.0
hydra:
  sweeper:
    storage: sqlite:///${hydra.sweep.dir}/optuna.db
    study_name: toy
    direction: minimize
    n_jobs: 2
    sampler:
      seed: 1
    params:
      x: interval(0, 1)
"""


def _study_with(sweep: Path, states: list[str]) -> optuna.Study:
    """A study whose trials stand in for those of an earlier, interrupted run of the app, each with its job folder
    (numbered by the trial) as that run left it: finished, or running for a trial killed before it ended."""
    sweep.mkdir(parents=True)
    study = optuna.create_study(study_name="toy", storage=f"sqlite:///{sweep}/optuna.db")
    for state in states:
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        if state == "COMPLETE":
            study.tell(trial, (x - 0.3) ** 2)
        job = Run(sweep / str(trial.number), [f"x={x}"])
        job.dir.mkdir()
        job.write("finished" if state == "COMPLETE" else "running", metric="x", value=(x - 0.3) ** 2)
    return study


def _run_app(tmp_path: Path, sweep: Path, n_trials: int) -> subprocess.CompletedProcess:
    (tmp_path / "app.py").write_text(_APP)
    (tmp_path / "app.yaml").write_text(_APP_CONFIG)
    return subprocess.run([sys.executable, str(tmp_path / "app.py"), "-m", f"hydra.sweep.dir={sweep}",
                           f"hydra.sweeper.n_trials={n_trials}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=HANG_GUARD)


@pytest.mark.parametrize(("states", "n_trials"), [
    (["COMPLETE", "RUNNING", "COMPLETE"], 4),  # a parallel batch of 1 and 2 interrupted: 2 ended, 1 was killed
    (["COMPLETE", "COMPLETE"], 3),             # a finished study extended by a trial
])
def test_a_resumed_optuna_sweep_runs_each_trial_in_its_own_job_folder(tmp_path, states, n_trials):
    sweep = tmp_path / "sweep"
    _study_with(sweep, states)
    earlier = {job.name: (job / "job.json").read_text() for job in sweep.iterdir() if job.is_dir()
               and _record(job)["status"] == "finished"}
    result = _run_app(tmp_path, sweep, n_trials)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna.load_study(study_name="toy", storage=f"sqlite:///{sweep}/optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * n_trials
    for trial in trials:  # every trial's job folder is numbered by the trial and records its parameters
        assert _record(sweep / str(trial.number))["overrides"] == [f"x={trial.params['x']}"]
    assert {job: (sweep / job / "job.json").read_text() for job in earlier} == earlier  # finished jobs untouched
