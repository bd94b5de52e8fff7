"""Seeds derived from keys, and the global random states that a checkpoint carries for an exact resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that is a function of `keys` alone (e.g. seed, epoch, index): no order, worker or rank enters."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def rng_states() -> dict[str, Any]:
    """The global states of torch (CPU and every CUDA device), numpy and Python, as tensors, lists and numbers
    only, so that checkpoints holding them still load with `torch.load(weights_only=True)`."""
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": [version, list(state), python_gauss],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` captured (CUDA states only where this machine has as many devices)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    key = numpy["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
