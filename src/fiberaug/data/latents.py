"""The latent cache of latent diffusion: each training image's posterior under the frozen autoencoder, computed once.

When the training pipeline only scales, centre-crops and flips a decoded image (`augment=none` or `flip` with
`data.resize_policy=resize`), an image reaches the encoder in one of a few fixed forms, and encoding it again every
epoch repeats the same work. The dataset then sends, with each image, a SHA-256 of the very pixels the encoder would
see (`AugmentedImages(digests=True)`); this cache maps that digest and the autoencoder's content hash to the
posterior's moments (mean and log-variance, diffusers' `DiagonalGaussianDistribution.parameters`), from which the
model draws a fresh latent at every step, as it does when it encodes.

Never stale: the key is made of the pixels themselves (so of the image's content and of every decode, scale and
flip setting that shaped them) and of the autoencoder's hash, so a changed image, setting or autoencoder has another
key, hence another entry. Two tiers, as the decoded-image cache: memory (CPU tensors, up to a budget) and a folder
of checksummed, atomically written `.npy` files (a damaged entry is encoded again and rewritten).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fiberaug.data.cache import parse_entry, write_entry

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the entries; part of every key


class LatentCache:
    """Posterior moments by pixel digest, for one autoencoder (`autoencoder_sha256`).

    `memory_bytes` bounds the memory tier, `folder` holds the disk tier (None: none). `encoded` and `reused` count
    the images encoded and those served from either tier since the last `take_counts`.
    """

    def __init__(self, autoencoder_sha256: str, memory_bytes: int, folder: Path | None = None) -> None:
        self.recipe = f"fiberaug-latents v{FORMAT_VERSION}; autoencoder {autoencoder_sha256}; float32 moments"
        self.memory_bytes = memory_bytes
        self.folder = folder
        self._memory: dict[str, torch.Tensor] = {}
        self._used = 0
        self._warned_write = False
        self.encoded = 0
        self.reused = 0

    @property
    def memory_used(self) -> int:
        return self._used

    def key(self, digest: bytes) -> str:
        return hashlib.sha256(digest + self.recipe.encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def moments(
        self, digests: torch.Tensor, images: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The moments of each image of the batch (B×32 digests, B images): cached ones looked up, the others
        encoded together by `encode` and stored."""
        keys = [self.key(bytes(row)) for row in digests.cpu().numpy()]
        found = [self._get(key) for key in keys]
        missing = [i for i, moments in enumerate(found) if moments is None]
        if missing:
            fresh = encode(images[missing]).float().cpu()
            for i, moments in zip(missing, fresh):
                found[i] = moments.clone()  # not a view: a view keeps the whole batch's storage alive
                self._put(keys[i], found[i])
        self.encoded += len(missing)
        self.reused += len(keys) - len(missing)
        return torch.stack(found).to(images.device)

    def take_counts(self) -> tuple[int, int]:
        """(encoded, reused) since the last call."""
        counts = self.encoded, self.reused
        self.encoded = self.reused = 0
        return counts

    def _get(self, key: str) -> torch.Tensor | None:
        moments = self._memory.get(key)
        if moments is not None or self.folder is None:
            return moments
        path = self.entry_path(key)
        try:
            moments = torch.from_numpy(parse_entry(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("latent cache: %s cannot be used (%s); encoding its image again", path, exc)
            return None
        self._remember(key, moments)
        return moments

    def _put(self, key: str, moments: torch.Tensor) -> None:
        self._remember(key, moments)
        if self.folder is None:
            return
        try:
            write_entry(self.entry_path(key), moments.numpy().astype(np.float32, copy=False))
        except OSError as exc:
            if not self._warned_write:
                self._warned_write = True
                log.warning("latent cache: cannot write to %s (%s); latents not in memory are encoded again",
                            self.folder, exc)

    def _remember(self, key: str, moments: torch.Tensor) -> None:
        size = moments.numel() * moments.element_size()
        if self._used + size <= self.memory_bytes:
            self._memory[key] = moments
            self._used += size
