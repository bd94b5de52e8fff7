"""The `trainer` config group checked before Lightning sees it, so that a mistyped option is one line naming it,
its value and what is accepted, not a `TypeError` from deep inside Lightning."""

from __future__ import annotations

import datetime
import difflib
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig

from fiberaug.errors import UserError, find_cause

# What a value of an option means, where its type does not say.
NOTES = {
    "max_steps": " (-1: no limit)",
    "max_epochs": " (null or -1: no limit)",
    "devices": " (auto: all)",
    "accelerator": " (cpu, gpu, auto)",
    "limit_train_batches": " (an integer: batches, a float: a fraction)",
    "limit_val_batches": " (an integer: batches, a float: a fraction)",
}
_SIMPLE = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a config value can be `hint`; types a config cannot spell (Lightning's classes) accept only a
    `_target_` node, whose object is built by instantiate."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin is list:
        return isinstance(value, (list, ListConfig)) and all(_accepts(args[0], v) for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, (dict, DictConfig))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool, type(None)):
        return isinstance(value, hint)
    return isinstance(value, DictConfig) and "_target_" in value


def _describe(hint: Any) -> tuple[list[str], list[str]]:
    """What `hint` accepts, in words: (the kinds of value, the values a Literal allows)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(arg) for arg in args]
        return [k for kinds, _ in parts for k in kinds], [v for _, values in parts for v in values]
    if origin is typing.Literal:
        return [], [repr(arg) for arg in args]
    if origin is list or hint is list:
        return ["a list"], []
    if origin is dict or hint in (dict, Path, datetime.timedelta):
        return [], []
    if hint in _SIMPLE:
        return [_SIMPLE[hint]], []
    return [f"{getattr(hint, '__name__', hint)} via _target_"], []


def _accepted(hint: Any) -> str:
    kinds, values = _describe(hint)
    if values:
        kinds.insert(0, f"one of {', '.join(values)}")
    return " or ".join(dict.fromkeys(kinds))


def check_trainer_options(trainer_cfg: DictConfig, passed: tuple[str, ...] = ()) -> None:
    """Refuse an unknown `trainer.*` key or a value of the wrong type; keys in `passed` are given to the Trainer by
    train.py itself and not checked here."""
    params = inspect.signature(pl.Trainer.__init__).parameters
    hints = typing.get_type_hints(pl.Trainer.__init__)
    for key, value in trainer_cfg.items():
        key = str(key)
        if key.startswith("_") or key in passed:
            continue
        if key not in params:
            close = difflib.get_close_matches(key, [p for p in params if p != "self"], n=3)
            hint = f"; did you mean {', '.join(f'trainer.{c}' for c in close)}?" if close else ""
            raise UserError(f"trainer.{key} is not an option of Lightning's Trainer{hint}")
        if key in hints and not _accepts(hints[key], value):
            raise UserError(f"trainer.{key}={value!r} must be {_accepted(hints[key])}{NOTES.get(key, '')}")
    accelerator = trainer_cfg.get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        choice = HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None
        named = f"trainer.accelerator={accelerator}"
        named = f"trainer={choice} ({named})" if choice else named
        raise UserError(f"{named}: no CUDA GPU here; use trainer=cpu, or trainer=default (accelerator=auto)")


def build_trainer(make: Callable[[], pl.Trainer]) -> pl.Trainer:
    """`make()`, with a configuration that Lightning refuses reported as one line."""
    try:
        return make()
    except Exception as exc:
        cause = find_cause(exc, MisconfigurationException)
        if cause is None:
            raise
        raise UserError(f"trainer: Lightning refuses this configuration: {cause}") from exc
