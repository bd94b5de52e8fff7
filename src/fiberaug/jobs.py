"""A job's record in its output folder, shared by `augment.py` and `sample.py`: `run.json` names the job,
`manifest.jsonl` holds one line per output, and files are written atomically.

Only one process appends to the manifest: one complete, fsynced line per output, after the output's files are in
place. A run killed at any moment leaves at worst a torn last line, which the next run cuts off, and outputs without
a line, which the next run makes again (to the same bytes). The same job (the same `run["job"]`) resumes; another
job in the folder is refused unless `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from fiberaug.errors import UserError
from fiberaug.files import remove_temp_files, write_atomic

MANIFEST, RUN_FILE = "manifest.jsonl", "run.json"
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


def versions(*packages: str) -> dict[str, str]:
    """Python's version and those of `packages` (distribution names), for a run file."""
    return {"python": platform.python_version(), **{name: version(name) for name in packages}}


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


def start_job(
    output_dir: Path,
    run: dict[str, Any],
    overwrite: bool,
    tool: str,
    files_of: Callable[[dict[str, Any]], Iterable[str]],
    products: Sequence[str] = (),
) -> bool:
    """Make output_dir ready for `run` of `tool` (augment, sample); True when it resumes the same job.

    The same job (same `run["job"]`) resumes. Another job is refused unless `overwrite`, which removes the files
    its manifest names (`files_of` each record; only below output_dir), the `products` rebuilt from it and its
    records; a non-empty folder without a job is refused unless `overwrite`, which writes into it without removing
    anything.
    """
    run_path = output_dir / RUN_FILE
    if run_path.is_file():
        try:
            previous = json.loads(run_path.read_text())["job"]
        except (ValueError, KeyError) as exc:
            raise UserError(f"{run_path} is not a run file of {tool}.py ({exc!r}); use another output_dir") from None
        if previous == run["job"] and not overwrite:
            remove_temp_files(output_dir)
            return True
        if not overwrite:
            changed = ", ".join(k for k in run["job"] if previous.get(k) != run["job"][k]) or "the tool"
            raise UserError(
                f"output_dir={output_dir} holds another job (its run.json differs in: {changed}); "
                "choose another output_dir, or pass overwrite=true to replace that job's outputs"
            )
        _remove_job(output_dir, files_of, products)
    elif any(output_dir.iterdir()) and not overwrite:
        raise UserError(
            f"output_dir={output_dir} is not empty and holds no {tool} job (run.json); choose an empty or new "
            "folder, or pass overwrite=true to write into it"
        )
    remove_temp_files(output_dir)
    (output_dir / MANIFEST).unlink(missing_ok=True)
    write_atomic(run_path, json.dumps(run, indent=2).encode())
    return False


def _remove_job(output_dir: Path, files_of: Callable[[dict[str, Any]], Iterable[str]], products: Sequence[str]) -> None:
    """Delete a job's outputs and records: only paths its manifest names that lie below output_dir."""
    root = output_dir.resolve()
    for record in read_records(output_dir / MANIFEST):
        for name in files_of(record):
            path = (output_dir / name).resolve()
            if path.is_relative_to(root) and path != root:
                path.unlink(missing_ok=True)
    for name in (MANIFEST, RUN_FILE, *products):
        (output_dir / name).unlink(missing_ok=True)
