"""The work behind the top-level scripts; each script is a thin `@hydra.main` wrapper around one task."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fiberaug.errors import UserError, find_cause
from fiberaug.runs import job_name, sweep_name

# conf/hydra/default.yaml names sweep folders with it. Cached on its argument's text, which is the same in the sweep's
# config and in each job's (Hydra copies the cache to them), so every job resolves the sweep's own name.
if not OmegaConf.has_resolver("fiberaug.sweep_name"):
    OmegaConf.register_new_resolver("fiberaug.sweep_name", lambda items: sweep_name(list(items)), use_cache=True)


def _job_name() -> str:
    """conf/logger/tensorboard.yaml's sub-folder: a sweep job's overrides (see `job_name`); none for a single run,
    nor for a multirun config composed outside a launched sweep (the compose API), whose sweep folder is unset."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is None or hydra.mode != RunMode.MULTIRUN:
        return ""
    try:
        sweep_dir = Path(hydra.sweep.dir)
    except OmegaConfBaseException:
        return ""
    return job_name(hydra.overrides.task, sweep_dir)


if not OmegaConf.has_resolver("fiberaug.job_name"):
    OmegaConf.register_new_resolver("fiberaug.job_name", _job_name)

# conf/hydra/launcher/submitit_slurm.yaml has the name of the submitit plugin's own config, so that users type the
# plugin's name; it extends that config under another name (hydra_plugins/fiberaug/launchers.py). Hydra still matches
# the two by name, and warns of that matching on every run, although the schemas are the same.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema")


# What Hydra writes into every run folder before the task starts (besides the log its job_logging names).
HYDRA_FILES = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})


def remove_unused_run_dir() -> None:
    """Remove the files Hydra wrote for this run, and its then empty folder, when that is all the folder holds: a
    run refused before it did anything leaves no folder behind. Nothing else is ever removed, and a folder holding
    anything else is left whole."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    run_dir = Path(OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None) or "")
    if not run_dir.is_absolute() or run_dir.is_symlink() or not run_dir.is_dir():
        return  # no run folder (a config composed in a test)
    if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        return  # the folder the command runs in
    log_file = OmegaConf.select(hydra_cfg, "job_logging.handlers.file.filename", default=None)
    meta = run_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None
    files = [Path(log_file)] if log_file and Path(log_file).parent == run_dir else []
    for entry in run_dir.iterdir():
        if entry == meta and entry.is_dir() and not entry.is_symlink():
            inside = list(entry.iterdir())
            if any(p.name not in HYDRA_FILES or not p.is_file() or p.is_symlink() for p in inside):
                return
            files += inside
        elif entry not in files or not entry.is_file() or entry.is_symlink():
            return
    for file in files:
        file.unlink(missing_ok=True)
    for folder in (meta, run_dir):
        if folder is not None:
            with contextlib.suppress(OSError):  # not empty after all: kept
                os.rmdir(folder)


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run `task`; a `UserError`, even one wrapped by Hydra's instantiate, exits with its one-line message, and
    removes the run's folder when the run wrote nothing there."""
    try:
        return task(cfg)
    except Exception as exc:
        cause = find_cause(exc, UserError)
        if cause is None:
            raise
        remove_unused_run_dir()
        raise SystemExit(f"error: {cause}") from None
