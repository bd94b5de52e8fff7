"""One entry point for every measure, so a command-line task and a training callback ask for the ones they want.

| name | better | what |
| --- | --- | --- |
| `swd`, `swd/<res>` | lower | sliced Wasserstein distance of Laplacian-pyramid patches ×1e3, mean and per level |
| `precision`, `recall`, `density`, `coverage` | higher | k-NN manifolds in the random embedding |
| `fid`, `kid` | lower | Fréchet and kernel Inception distances (only with a local Inception file) |
| `kid_std` | lower | spread of KID over its subsets: how far to trust `kid`; not a quality measure |
| `memorisation` | lower | share of generated images that are copies of a training image |
| `memorisation/repeats` | lower | share of generated images with a near-identical twin among them: collapse |
| `memorisation/median_ratio` | higher | median d(nearest)/d(second nearest) training image: 1 is far from copying |
| `class_consistency`, `…/<class>` | higher | share read as their class by a classifier trained on real images |
| `classifier_accuracy` | higher | that classifier's accuracy on held-out real images: how far to trust it |

`CHEAP` (SWD and memorisation), for a training callback: 500 against 500 images take about half a second
at 16×16 and 2–3 s at 64×64×3 on two CPU cores (SWD is nearly all of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fiberaug.errors import UserError
from fiberaug.metrics.consistency import class_consistency, fit_reader
from fiberaug.metrics.images import match_sets
from fiberaug.metrics.inception import fid_kid
from fiberaug.metrics.memorisation import Memorisation, memorisation, nearest_sheet
from fiberaug.metrics.prdc import precision_recall_density_coverage
from fiberaug.metrics.swd import sliced_wasserstein

METRICS = ("swd", "prdc", "fid", "memorisation", "class_consistency")
CHEAP = ("swd", "memorisation")

_MODES = {
    "swd": "min", "precision": "max", "recall": "max", "density": "max", "coverage": "max", "fid": "min",
    "kid": "min", "kid_std": "min", "memorisation": "min", "memorisation/repeats": "min",
    "memorisation/median_ratio": "max",
    "class_consistency": "max", "classifier_accuracy": "max",
}
_FAMILIES = ("swd", "class_consistency")  # names with a per-level or per-class suffix


@dataclass
class Evaluation:
    """What `evaluate_images` found: flat metric values, one-line notes, and pictures (`"nearest"`: the
    closest generated/training pairs, for nearest.png)."""

    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    artefacts: dict[str, np.ndarray] = field(default_factory=dict)
    memorisation: Memorisation | None = None  # per generated image: nearest training images and ratios


def evaluate_images(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    train: torch.Tensor | None = None,
    real_labels: Sequence[int] | torch.Tensor | None = None,
    fake_labels: Sequence[int] | torch.Tensor | None = None,
    class_names: Sequence[str] = (),
    metrics: Sequence[str] = METRICS,
    seed: int = 0,
    inception: str | Path | None = None,
    sheet_rows: int = 16,
    device: str | torch.device = "cpu",
) -> Evaluation:
    """Measure generated images `fake` against `real` ones (both N×C×H×W in [-1, 1]).

    `metrics` names groups from `METRICS`: `swd`, `prdc` (precision, recall, density, coverage), `fid` (FID
    and KID, only with `inception`, the path of a local Inception file; otherwise a note says how to enable
    them), `memorisation` (against `train`, the model's training images; `real` when not given), and
    `class_consistency` (a classifier fitted on `real` with `real_labels` reads `fake`, drawn for
    `fake_labels`; skipped with a note without labels). `sheet_rows` pairs go into the nearest sheet (0:
    none). `device` runs the Inception network. Deterministic for a given `seed`.
    """
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise UserError(f"metrics: {', '.join(map(repr, unknown))} not known; choose from {', '.join(METRICS)}")
    real, fake, compared = match_sets(real, fake)
    result = Evaluation(notes=[compared])
    if "swd" in metrics:
        result.values |= sliced_wasserstein(real, fake, seed=seed)
    if "prdc" in metrics:
        result.values |= precision_recall_density_coverage(real, fake)
    if "fid" in metrics:
        values, notes = fid_kid(real, fake, inception, seed=seed, device=device)
        result.values |= values
        result.notes += notes
    if "memorisation" in metrics:
        if train is None:
            result.notes.append("memorisation measured against the real images: no training set given")
        train = real if train is None else train
        result.memorisation = memorisation(fake, train)
        result.values |= result.memorisation.values()
        if sheet_rows:
            result.artefacts["nearest"] = nearest_sheet(fake, train, result.memorisation, rows=sheet_rows)
    if "class_consistency" in metrics:
        if real_labels is None or fake_labels is None:
            result.notes.append("class consistency skipped: it needs real_labels and fake_labels")
        else:
            reader = fit_reader(real, real_labels, seed=seed)
            result.values |= class_consistency(reader, fake, fake_labels, class_names)
    return result


def monitor_mode(name: str) -> str:
    """"min" or "max": which way a checkpoint monitor should rank the metric `name` (with or without a
    logger prefix such as `val/`)."""
    for candidate in (name, name.partition("/")[2]):
        if candidate in _MODES:
            return _MODES[candidate]
        if candidate.partition("/")[0] in _FAMILIES:
            return _MODES[candidate.partition("/")[0]]
    raise UserError(f"{name!r} is not a metric of fiberaug.metrics; known: {', '.join(_MODES)} and their "
                    f"per-level (swd/<res>) and per-class (class_consistency/<class>) values")
