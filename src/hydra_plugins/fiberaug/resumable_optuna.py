"""`hydra/sweeper=resumable_optuna`: Hydra's Optuna sweeper, continued by running the same command again."""

# No `from __future__ import annotations`: Hydra scans plugins outside sys.modules, where dataclasses cannot read them.
import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    """Hydra's Optuna sweeper, which on a study's storage runs only the trials the study still lacks.

    The plugin itself runs `n_trials` more trials at every start and numbers their jobs from 0, into the
    folders of earlier trials. This one subtracts the finished trials, numbers the jobs on from the study's
    trials, and puts a trial that an interruption left running back into the queue: it runs again with its
    parameters and job number, so its job folder, with its `last.ckpt`, is the same (FiberAug's train task
    resumes it there).
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
            impl.job_idx = min((t.number for t in interrupted), default=len(trials))
            log.info(
                "Study %s: %d trials finished, %d interrupted ones to run again, %d trials to run",
                study.study_name, finished, len(interrupted), impl.n_trials,
            )
        super().sweep(arguments)


@dataclass
class ResumableOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.fiberaug.resumable_optuna.ResumableOptunaSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper", name="resumable_optuna", node=ResumableOptunaSweeperConf, provider="fiberaug"
)
