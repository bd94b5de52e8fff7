"""`hydra/sweeper=resumable_optuna`: Hydra's Optuna sweeper, continued by running the same command again."""

# No `from __future__ import annotations`: Hydra scans plugins outside sys.modules, where dataclasses cannot read them.
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    """Hydra's Optuna sweeper, which on a study's storage runs only the trials the study still lacks.

    The plugin itself runs `n_trials` more trials at every start and numbers their jobs from 0, into the
    folders of earlier trials. This one subtracts the finished trials and puts a trial that an interruption left
    running back into the queue, and every job's number is its trial's number: a trial run again finds its job
    folder with its `last.ckpt` (FiberAug's train task resumes it there), and a new trial gets a folder no earlier
    trial used, whatever order the jobs of an interrupted parallel batch ended in.
    """

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        impl = self.sweeper
        if impl.storage is not None:
            Path(str(impl.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)  # may hold the storage
            study = optuna.create_study(
                study_name=impl.study_name, storage=impl.storage, directions=impl._get_directions(), load_if_exists=True
            )
            trials = study.get_trials(deepcopy=False)
            interrupted = [t for t in trials if t.state == TrialState.RUNNING]
            for trial in interrupted:  # Optuna has no public call for this; `ask` pops waiting trials first
                study._storage.set_trial_state(trial._trial_id, TrialState.WAITING)
            finished = sum(t.state.is_finished() for t in trials)
            impl.n_trials = max(0, impl.n_trials - finished)
            log.info(
                "Study %s: %d trials finished, %d interrupted ones to run again, %d trials to run",
                study.study_name, finished, len(interrupted), impl.n_trials,
            )
        numbers: list[int] = []
        configure = impl._configure_trials

        def configure_numbered(trials: list, *args: Any) -> Any:
            numbers[:] = [trial.number for trial in trials]
            return configure(trials, *args)

        impl._configure_trials = configure_numbered
        impl.launcher = _TrialNumberedLauncher(impl.launcher, numbers)
        super().sweep(arguments)


class _TrialNumberedLauncher:
    """Launches each job of a batch under its trial's number; runs of consecutive numbers go out together, so a
    parallel launcher still runs a fresh batch at once."""

    def __init__(self, launcher: Any, numbers: list[int]) -> None:
        self.launcher, self.numbers = launcher, numbers

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        returns: list[Any] = []
        start = 0
        while start < len(job_overrides):
            stop = start + 1
            while stop < len(job_overrides) and self.numbers[stop] == self.numbers[stop - 1] + 1:
                stop += 1
            returns += self.launcher.launch(job_overrides[start:stop], initial_job_idx=self.numbers[start])
            start = stop
        return returns


@dataclass
class ResumableOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.fiberaug.resumable_optuna.ResumableOptunaSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper", name="resumable_optuna", node=ResumableOptunaSweeperConf, provider="fiberaug"
)
