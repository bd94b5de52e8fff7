"""FID and KID, only from a local Inception weights file: nothing is ever downloaded.

The file is `inception-2015-12-05.pt`, NVIDIA's TorchScript port of the TensorFlow Inception v3 that the
original FID used, as clean-fid and StyleGAN2-ADA load it. Its calling convention (clean-fid's
`InceptionV3W`, StyleGAN's `metric_utils`): `net(images, return_features=True)` with images N×3×H×W, RGB,
values 0–255 (uint8); it resizes to 299×299 and normalises inside and returns the N×2048 pool features.
Grayscale images are repeated to three channels, as StyleGAN does.

The statistics are torchmetrics' `FrechetInceptionDistance` and `KernelInceptionDistance` (imported only
here: torchmetrics pulls in transformers). Both run their `feature` module inside `update()`, so with the
network there each would run it over every image, the slow part on a CPU; the network runs once here and both
receive its features through a pass-through module. FID, KID: lower is better; `kid_std` is the spread of
KID over its random subsets, not a quality measure.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from fiberaug.errors import UserError
from fiberaug.metrics.images import match_sets

INCEPTION_FILE = "inception-2015-12-05.pt"
SKIPPED_NOTE = f"FID/KID skipped: pass inception=PATH, a local copy of {INCEPTION_FILE} (TorchScript)"
EXPECTED = f"a TorchScript Inception such as {INCEPTION_FILE}, called as net(uint8 N×3×H×W, return_features=True)"
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000


def fid_kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    inception: str | Path | None,
    *,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, float], list[str]]:
    """`({"fid", "kid", "kid_std"}, notes)`; without `inception`, `({}, [a note saying how to enable them])`.

    KID averages 100 subsets of min(1000, half the smaller set) images from each set (StyleGAN's 1000 when the
    sets are large; half, so that small sets still give a spread), drawn reproducibly from `seed`.
    """
    if inception is None:
        return {}, [SKIPPED_NOTE]
    real, fake, _ = match_sets(real, fake)
    if min(len(real), len(fake)) < 2:
        raise UserError(f"FID/KID need at least 2 real and 2 generated images, got {len(real)} and {len(fake)}")
    network = load_inception(inception, device)
    real_features, fake_features = (_features(network, x, batch_size, device, inception) for x in (real, fake))
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    passthrough = _PassThrough(real_features.shape[1])
    fid = FrechetInceptionDistance(feature=passthrough)
    subset_size = max(2, min(KID_SUBSET_SIZE, len(real) // 2, len(fake) // 2))
    with warnings.catch_warnings():  # KID warns that it keeps every feature vector: here they are kept anyway
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=passthrough, subsets=KID_SUBSETS, subset_size=subset_size)
    for metric in (fid, kid):
        metric.update(real_features, real=True)
        metric.update(fake_features, real=False)
    # KID draws its subsets with torch.randperm from the global generator: seed it, then give its state back.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item()}, []


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript network at `path` on `device`, loaded once per file and modification time."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"inception={path} is not a file; expected {EXPECTED}")
    return _load(str(path.resolve()), path.stat().st_mtime_ns, str(device))


@functools.lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, device: str) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(path, map_location=device).eval()
    except Exception as exc:  # jit.load raises RuntimeError, ValueError, pickle and zip errors by file kind
        reason = _first_line(exc)
        raise UserError(f"inception={path} is not a TorchScript file ({reason}); expected {EXPECTED}") from exc


@torch.no_grad()
def _features(
    network: torch.jit.ScriptModule, images: torch.Tensor, batch_size: int, device: str | torch.device, path: str | Path
) -> torch.Tensor:
    """The network's features of [-1, 1] images, fed as it expects: uint8 RGB, on `device`."""
    batches = []
    for batch in images.split(batch_size):
        pixels = ((batch + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).to(device)
        try:
            output = network(pixels, return_features=True)
        except Exception as exc:  # TorchScript reports a wrong signature or shape as a RuntimeError
            reason = _first_line(exc)
            raise UserError(f"inception={path} did not take the images ({reason}); expected {EXPECTED}") from exc
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or len(output) != len(batch):
            raise UserError(f"inception={path} returned {getattr(output, 'shape', type(output).__name__)} "
                            f"for {len(batch)} images; expected {EXPECTED}, giving N×2048 features")
        batches.append(output.double().cpu())
    return torch.cat(batches)


def _first_line(exc: Exception) -> str:
    """The first sentence of an error, for a one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(exc).__name__


class _PassThrough(nn.Module):
    """torchmetrics' `feature` module for features computed already; `num_features` spares its probe run."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
