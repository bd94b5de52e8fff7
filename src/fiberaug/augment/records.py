"""The record of a job in output_dir: `run.json` names the job, `manifest.jsonl` holds one line per output.

Only the parent process appends to the manifest: one complete, fsynced line per output, after the output's
files are in place. A run killed at any moment leaves at worst a torn last line, which the next run cuts off,
and outputs without a line, which the next run makes again (to the same bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fiberaug.augment.plan import Output
from fiberaug.errors import UserError
from fiberaug.files import remove_temp_files, write_atomic

MANIFEST, RUN_FILE = "manifest.jsonl", "run.json"
# Rebuilt from the manifest at the end of every run.
PRODUCTS = ("contact_sheet.png", "annotations.json")
_SMALL_ARRAY = 64


def json_safe(value: Any) -> Any:
    """`value` with numpy numbers and small arrays (kernels, matrices) as plain numbers and lists.

    Arrays as large as the image (noise maps) are recorded by shape and dtype: the seed redraws them.
    """
    if isinstance(value, np.ndarray):
        if value.size > _SMALL_ARRAY:
            return {"array_shape": list(value.shape), "dtype": str(value.dtype)}
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of a file, or None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def versions() -> dict[str, str]:
    packages = ("fiberaug", "albumentations", "albucore", "numpy", "pillow")
    return {"python": platform.python_version(), **{name: version(name) for name in packages},
            "opencv": cv2.__version__}


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The complete lines of a manifest in order; a torn last line (a run killed mid-write) is left out."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise UserError(f"{path} line {number} is not JSON ({exc}); was the manifest edited?") from None


class Manifest:
    """manifest.jsonl opened for appending, with a torn last line cut off first so it stays valid JSON Lines."""

    def __init__(self, path: Path) -> None:
        if path.is_file():
            _cut_torn_line(path)
        self.file = open(path, "ab")

    def append(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record).encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _cut_torn_line(path: Path, chunk: int = 1 << 16) -> None:
    with open(path, "r+b") as f:
        end = pos = f.seek(0, os.SEEK_END)
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            pos = start
        if keep < end:
            f.truncate(keep)


@dataclass(frozen=True)
class Done:
    """What the manifest says of one output: enough to decide whether to make it again."""

    status: str
    source_sha256: str | None
    files: tuple[str, ...]
    error: str | None

    @classmethod
    def of(cls, record: dict[str, Any]) -> Done:
        return cls(record["status"], record.get("source_sha256"), record_files(record), record.get("error"))

    def holds(self, source: Path, output_dir: Path) -> bool:
        """An output stays done while its files exist; a failure while its source is unchanged (or still unreadable)."""
        if self.status == "ok":
            return all((output_dir / f).is_file() for f in self.files)
        return self.source_sha256 == file_sha256(source)


def record_files(record: dict[str, Any]) -> tuple[str, ...]:
    """The files of one output: the image and its augmented mask and labels, relative to output_dir."""
    if record["status"] != "ok":
        return ()
    extra = record.get("annotations", {})
    return (record["output"], *(extra[key] for key in ("mask", "labels") if extra.get(key)))


def latest_records(output_dir: Path) -> dict[str, Done]:
    """The last record of each output in output_dir's manifest (a retried output has several)."""
    return {record["output"]: Done.of(record) for record in read_records(output_dir / MANIFEST)}


def start_job(output_dir: Path, run: dict[str, Any], overwrite: bool) -> dict[str, Done]:
    """Make output_dir ready for `run`; returns what an earlier run of the same job already made.

    The same job (same `run["job"]`) resumes. Another job is refused unless `overwrite`, which removes the
    files its manifest names (only below output_dir) and its records; a non-empty folder without a job is
    refused unless `overwrite`, which writes into it without removing anything.
    """
    run_path = output_dir / RUN_FILE
    if run_path.is_file():
        try:
            previous = json.loads(run_path.read_text())["job"]
        except (ValueError, KeyError) as exc:
            raise UserError(f"{run_path} is not a run file of augment.py ({exc!r}); use another output_dir") from None
        if previous == run["job"] and not overwrite:
            remove_temp_files(output_dir)
            return latest_records(output_dir)
        if not overwrite:
            changed = ", ".join(k for k in run["job"] if previous.get(k) != run["job"][k])
            raise UserError(
                f"output_dir={output_dir} holds another job (its run.json differs in: {changed}); "
                "choose another output_dir, or pass overwrite=true to replace that job's outputs"
            )
        _remove_job(output_dir)
    elif any(output_dir.iterdir()) and not overwrite:
        raise UserError(
            f"output_dir={output_dir} is not empty and holds no augment job (run.json); choose an empty or new "
            "folder, or pass overwrite=true to write into it"
        )
    remove_temp_files(output_dir)
    (output_dir / MANIFEST).unlink(missing_ok=True)
    write_atomic(run_path, json.dumps(run, indent=2).encode())
    return {}


def _remove_job(output_dir: Path) -> None:
    """Delete a job's outputs and records: only paths its manifest names that lie below output_dir."""
    root = output_dir.resolve()
    for record in read_records(output_dir / MANIFEST):
        for name in record_files(record):
            path = (output_dir / name).resolve()
            if path.is_relative_to(root) and path != root:
                path.unlink(missing_ok=True)
    for name in (MANIFEST, RUN_FILE, *PRODUCTS):
        (output_dir / name).unlink(missing_ok=True)


def replay_outputs(manifest: Path) -> tuple[dict[str, Any], list[Output]]:
    """The run file beside a manifest, and the outputs the manifest records as made, with their seeds and hashes."""
    run_path = manifest.parent / RUN_FILE
    if not manifest.is_file() or not run_path.is_file():
        raise UserError(f"replay={manifest}: pass a manifest.jsonl that has the run.json of its job beside it")
    made: dict[str, Output | None] = {}
    for r in read_records(manifest):
        out = Output(r["source"], r["copy"], r["seed"], expected_sha256=r.get("output_sha256"))
        made[r["output"]] = out if r["status"] == "ok" else None
    return json.loads(run_path.read_text()), [out for out in made.values() if out is not None]
