"""Precision and recall (Kynkäänniemi et al. 2019, k = 3), density and coverage (Naeem et al. 2020, k = 5).

Each real image gets a ball reaching its k-th nearest real neighbour (likewise each generated image among
the generated ones); all four are counts of points inside balls, in the random-embedding space of
`fiberaug.metrics.features`. Higher is better for all four.

- precision: share of generated images inside some real ball (are they realistic?);
- recall: share of real images inside some generated ball (is the real variety reproduced?);
- density: real balls containing each generated image, ÷ k, averaged: about 1 when the two sets match,
  above 1 when the generated images crowd where real ones are densest; less swayed by outliers than precision;
- coverage: share of real images whose ball holds at least one generated image (recall without the
  generated outliers' inflated balls).

The formulas are those of clovaai's `prdc` package (the authors' reference, which the tests check against);
it is not called at run time: it prints on every call, runs a hard-coded 8 threads, and takes one k per
call, so the two ks here would compute all the distances twice. Memory: three distance matrices in float64,
0.8 GB each for 10k × 10k images.
"""

from __future__ import annotations

import numpy as np
import torch

from fiberaug.errors import UserError
from fiberaug.metrics.features import embed
from fiberaug.metrics.images import match_sets

K_PRECISION_RECALL = 3
K_DENSITY_COVERAGE = 5


def precision_recall_density_coverage(
    real: torch.Tensor, fake: torch.Tensor, *, k_pr: int = K_PRECISION_RECALL, k_dc: int = K_DENSITY_COVERAGE
) -> dict[str, float]:
    """`{"precision", "recall", "density", "coverage"}` of generated images against real ones (higher is better)."""
    real, fake, _ = match_sets(real, fake)
    return prdc_from_features(embed(real), embed(fake), k_pr=k_pr, k_dc=k_dc)


def prdc_from_features(
    real: np.ndarray, fake: np.ndarray, *, k_pr: int = K_PRECISION_RECALL, k_dc: int = K_DENSITY_COVERAGE
) -> dict[str, float]:
    """The four metrics from feature vectors (N×D arrays), exactly as clovaai's `prdc.compute_prdc`."""
    k_max = max(k_pr, k_dc)
    if min(len(real), len(fake)) <= k_max:
        raise UserError(f"precision/recall/density/coverage need more than {k_max} real and generated images, "
                        f"got {len(real)} real and {len(fake)} generated")
    # float64: distances come from ‖a‖² + ‖b‖² − 2ab, whose rounding near 0 float32 would magnify.
    real_t, fake_t = (torch.from_numpy(np.asarray(x, np.float64)) for x in (real, fake))
    real_fake = torch.cdist(real_t, fake_t)  # real × fake
    real_radii, fake_radii = _radii(real_t, (k_pr, k_dc)), _radii(fake_t, (k_pr,))
    inside_pr = real_fake < real_radii[k_pr][:, None]  # fake j inside the k_pr-ball of real i
    inside_dc = real_fake < real_radii[k_dc][:, None]
    return {
        "precision": inside_pr.any(dim=0).double().mean().item(),
        "recall": (real_fake < fake_radii[k_pr][None, :]).any(dim=1).double().mean().item(),
        "density": inside_dc.sum(dim=0).double().mean().item() / k_dc,
        "coverage": (real_fake.min(dim=1).values < real_radii[k_dc]).double().mean().item(),
    }


def _radii(points: torch.Tensor, ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Distance from each point to its k-th nearest other point, for each k (the point itself is the 0th)."""
    nearest = torch.topk(torch.cdist(points, points), max(ks) + 1, dim=1, largest=False).values
    return {k: nearest[:, k] for k in ks}
