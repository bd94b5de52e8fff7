"""Measures of generated images against real ones: SWD, precision/recall/density/coverage, FID/KID,
memorisation and class consistency.

Every function takes image batches N×C×H×W in [-1, 1] (C = 1 or 3, any size), as the models' `sample()`
and the DataModules give them; two sets are brought to one size and channel count by `match_sets`. Nothing
is downloaded; random draws come from explicitly seeded generators. This package imports only torch, numpy,
scikit-learn, Pillow (and torchmetrics, inside `fid_kid`) and, of FiberAug, `errors` and `imaging`.
"""

from fiberaug.metrics.consistency import ClassReader, class_consistency, fit_reader
from fiberaug.metrics.evaluation import CHEAP, METRICS, Evaluation, evaluate_images, monitor_mode
from fiberaug.metrics.features import embed
from fiberaug.metrics.images import match_sets
from fiberaug.metrics.inception import SKIPPED_NOTE, fid_kid, load_inception
from fiberaug.metrics.memorisation import COPY_RATIO, CopyTest, Memorisation, memorisation, nearest_sheet
from fiberaug.metrics.prdc import prdc_from_features, precision_recall_density_coverage
from fiberaug.metrics.swd import sliced_wasserstein

__all__ = [
    "CHEAP",
    "COPY_RATIO",
    "CopyTest",
    "METRICS",
    "SKIPPED_NOTE",
    "ClassReader",
    "Evaluation",
    "Memorisation",
    "class_consistency",
    "embed",
    "evaluate_images",
    "fid_kid",
    "fit_reader",
    "load_inception",
    "match_sets",
    "memorisation",
    "monitor_mode",
    "nearest_sheet",
    "prdc_from_features",
    "precision_recall_density_coverage",
    "sliced_wasserstein",
]
