"""What a run prints: none of Lightning's messages that are not the user's business, and at its end where its
results went (a run's folder, checkpoints and metrics; a sweep's jobs, best first)."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fiberaug.errors import UserError
from fiberaug.runs import RECORD

if TYPE_CHECKING:  # Hydra builds SweepSummary for every script: augment.py starts without Lightning
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

# Lightning's warnings that say nothing about the user's run:
QUIET_WARNINGS = (
    # a deprecation inside Lightning itself, with newer torch;
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the GAN validates nothing, but its DataModule's validation images feed the sample metrics;
    r"You passed in a `val_dataloader` but have no `validation_step`",
    # the interval counts steps across epochs, so a short epoch logs all the same.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
# Lightning's advertisement, printed at every trainer's construction.
QUIET_INFO = ("💡 Tip: For seamless cloud logging",)
# The metrics a run's summary shows.
SUMMARISED = ("loss/", "val/")


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_lightning() -> None:
    """Drop the messages above; a run's own warnings (unreadable files, precision fallbacks) still show."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages(QUIET_INFO))


def _number(value: Any) -> str:
    return f"{float(value):.4g}"


def summarise(trainer: pl.Trainer, run_dir: Path) -> None:
    """Say at the end of training where the run went: its folder, last and best checkpoints, and the final values of
    its losses and validation metrics (the step counters, learning rates and diagnostics are in TensorBoard)."""
    lines = [f"run folder: {run_dir}"]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "last_model_path", ""):
        lines.append(f"last checkpoint: {checkpoint.last_model_path}")
    if checkpoint is not None and getattr(checkpoint, "best_model_path", ""):
        score = checkpoint.best_model_score
        shown = f" ({checkpoint.monitor}={_number(score)})" if score is not None else ""
        lines.append(f"best checkpoint: {checkpoint.best_model_path}{shown}")
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(SUMMARISED) and v.numel() == 1}
    if metrics:
        lines.append("final metrics: " + ", ".join(f"{k}={_number(v)}" for k, v in sorted(metrics.items())))
    log.info("\n".join(lines))


def _mode(metric: str) -> str:
    """"min" or "max": how `metric` ranks; losses and metrics fiberaug.metrics does not know minimise."""
    from fiberaug.metrics.evaluation import monitor_mode

    if metric.startswith("loss/"):
        return "min"
    try:
        return monitor_mode(metric)
    except UserError:
        return "min"


def sweep_table(sweep_dir: Path) -> str | None:
    """A table of a sweep's jobs from their `job.json`: number, status, metric value and overrides, the finished
    ones best first, then the others by number; None when no job left a record."""
    rows = []
    for record_path in sorted(sweep_dir.glob(f"*/{RECORD}")):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {"status": "unreadable record"}
        rows.append((record_path.parent.name, record))
    if not rows:
        return None
    metric = next((r["metric"] for _, r in rows if r.get("metric")), None)
    sign = -1 if metric and _mode(metric) == "max" else 1

    def rank(row: tuple[str, dict[str, Any]]) -> tuple[int, float, int, str]:
        name, record = row
        value = record.get("value")
        scored = record.get("status") == "finished" and isinstance(value, (int, float)) and math.isfinite(value)
        order = int(name) if name.isdigit() else math.inf
        return (0, sign * value, order, name) if scored else (1, 0.0, order, name)

    table = [("job", "status", metric or "metric", "overrides")]
    for name, record in sorted(rows, key=rank):
        value = record.get("value")
        shown = _number(value) if isinstance(value, (int, float)) else "-"
        table.append((name, str(record.get("status", "?")), shown, " ".join(record.get("overrides", [])) or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in table]
    order = f", best ({_mode(metric)}) first" if metric else ""
    return f"sweep {sweep_dir}: {len(rows)} jobs{order}\n" + "\n".join(line.rstrip() for line in lines)


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): a `-m` sweep ends with the table of its jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        table = sweep_table(Path(config.hydra.sweep.dir))
        if table is not None:
            print(table, flush=True)
