"""The work behind the top-level scripts; each script is a thin `@hydra.main` wrapper around one task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from fiberaug.errors import UserError


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run `task`; a `UserError`, even one wrapped by Hydra's instantiate, exits with its one-line message."""
    try:
        return task(cfg)
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise SystemExit(f"error: {cause}") from None
