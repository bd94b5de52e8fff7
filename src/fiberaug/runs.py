"""What a run leaves on disk for the runs after it: its record (`job.json`), where `ckpt_path=last` looks, and the
name of a sweep's folder, so that an interrupted run or sweep continues with the same command; and the names of a
sweep's runs in TensorBoard."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fiberaug.errors import UserError
from fiberaug.files import write_atomic

RECORD = "job.json"
SWEEP_OVERRIDES = "sweep_overrides.yaml"


def identifying(overrides: Sequence[str]) -> list[str]:
    """A run's command-line overrides as they identify it: sorted (Optuna lists a trial's parameters in another
    order when it runs the trial again), and without `ckpt_path`, which only says where the run starts."""
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "ckpt_path")


def sweep_name(overrides: Sequence[str]) -> str:
    """The folder name of a sweep: its overrides, readable and short, and a hash of them.

    The same command gives the same folder, so running an interrupted sweep again continues it (Hydra's own
    default is a timestamp: a new folder every time).
    """
    items = [str(o) for o in overrides]
    return f"{_slug(' '.join(items))[:80] or 'defaults'}-{hashlib.sha256(json.dumps(items).encode()).hexdigest()[:8]}"


class SweepOverrides(Callback):
    """Writes a sweep command's overrides to `<sweep dir>/sweep_overrides.yaml` before its jobs start: a job knows
    only its own overrides, and `job_name` leaves out those every job of the sweep shares."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / SWEEP_OVERRIDES, OmegaConf.to_yaml(list(config.hydra.overrides.task)).encode())


def job_name(overrides: Sequence[str], sweep_dir: Path) -> str:
    """A sweep job's TensorBoard run name: the overrides it does not share with the rest of its sweep, as one
    folder name (`model.lr=0.001,seed=1`), so that TensorBoard tells the sweep's runs apart by what they changed."""
    shared = OmegaConf.load(sweep_dir / SWEEP_OVERRIDES) if (sweep_dir / SWEEP_OVERRIDES).is_file() else []
    own = [o for o in identifying([str(o) for o in overrides]) if o not in shared]
    return _slug(",".join(own))[:200] or "defaults"


def _slug(text: str) -> str:
    """`text` with every run of characters unsafe in a file name (`/`, spaces, quotes) replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9._,=+-]+", "_", text).strip("_")


@dataclass
class Run:
    """A run's folder and the overrides that identify it; `job.json` there records them and the result."""

    dir: Path
    overrides: list[str]

    @property
    def last_checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "last.ckpt"

    def record(self) -> dict[str, Any] | None:
        path = self.dir / RECORD
        return json.loads(path.read_text()) if path.is_file() else None

    def write(self, status: str, **fields: Any) -> None:
        record = {"overrides": self.overrides, "status": status, **fields}
        write_atomic(self.dir / RECORD, (json.dumps(record, indent=2) + "\n").encode())

    def sweep_state(self) -> tuple[dict[str, Any] | None, Path | None]:
        """For a sweep job: (its record if it ended, finished or failed, else None; its `last.ckpt` to resume from,
        or None).

        A folder that records other overrides belongs to another job; it is never trained over.
        """
        record = self.record()
        if record is None:
            return None, None
        if record["overrides"] != self.overrides:
            raise UserError(
                f"{self.dir} holds the job {' '.join(record['overrides']) or '(no overrides)'}, not this one "
                f"({' '.join(self.overrides)}); continue that sweep with its own command, or pass hydra.sweep.dir=NEW"
            )
        if record["status"] in ("finished", "failed"):
            return record, None
        return None, self.last_checkpoint if self.last_checkpoint.is_file() else None


def find_last_checkpoint(runs: Path, run: Run) -> Path:
    """The newest `last.ckpt` below `runs/*/checkpoints/` of a run with `run`'s overrides, other than `run` itself."""
    found = []
    for ckpt in runs.glob(f"*/checkpoints/{run.last_checkpoint.name}"):
        other = Run(ckpt.parent.parent, [])
        record = other.record()
        if other.dir.resolve() != run.dir.resolve() and record and record["overrides"] == run.overrides:
            found.append(ckpt)
    if not found:
        shown = " ".join(run.overrides) or "none"
        raise UserError(f"ckpt_path=last: no run with the same overrides ({shown}) has {runs}/*/checkpoints/last.ckpt")
    return max(found, key=lambda p: p.stat().st_mtime)
