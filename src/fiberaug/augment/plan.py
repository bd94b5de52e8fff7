"""What a run makes: `copies` outputs per source image, named and seeded from the source alone."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from fiberaug.data.images import IMAGE_EXTENSIONS, list_images
from fiberaug.errors import UserError


@dataclass(frozen=True)
class Output:
    """Copy `copy` of `source` (a POSIX path relative to input_dir), drawn with `seed`.

    `boxes` are the source's COCO boxes, if any; `expected_sha256` is the recorded hash when replaying.
    """

    source: str
    copy: int
    seed: int
    boxes: tuple[dict[str, Any], ...] = ()
    expected_sha256: str | None = None

    @property
    def image(self) -> str:
        return output_name(self.source, self.copy)


def output_seed(seed: int, source: str, copy: int) -> int:
    """The seed of one output, from (run seed, source, copy) only, so worker count and order cannot matter.

    A stable hash, not Python's `hash` (salted per process); 53 bits, so every JSON reader keeps it exact.
    """
    digest = hashlib.sha256(f"{seed}\0{source}\0{copy}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**53


def output_name(source: str, copy: int, suffix: str | None = None) -> str:
    """`dir/name.ext` → `dir/name_aug<copy>.ext` (or with `suffix`), mirroring the source's sub-folders."""
    path = PurePosixPath(source)
    return str(path.with_name(f"{path.stem}_aug{copy}{suffix if suffix is not None else path.suffix}"))


def check_folders(input_dir: Any, output_dir: Any) -> tuple[Path, Path]:
    """Absolute input and output folders, refusing any overlap: outputs must never land among the inputs."""
    if not input_dir or not output_dir:
        raise UserError("input_dir and output_dir are required: python augment.py input_dir=DIR output_dir=DIR")
    source, target = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not source.is_dir():
        raise UserError(f"input_dir={input_dir} is not a folder")
    if target == source or target.is_relative_to(source):
        raise UserError(f"output_dir={output_dir} is inside input_dir={input_dir}; choose a folder outside it")
    if source.is_relative_to(target):
        raise UserError(f"output_dir={output_dir} contains input_dir={input_dir}; choose a folder outside it")
    if target.exists() and not target.is_dir():
        raise UserError(f"output_dir={output_dir} is a file, not a folder")
    return source, target


def sources(input_dir: Path, exclude: tuple[Path, ...] = ()) -> list[str]:
    """The images below `input_dir` (sorted, POSIX, relative), outside the `exclude` folders (masks)."""
    found = [p for p in list_images(input_dir) if not any(p.is_relative_to(e) for e in exclude)]
    if not found:
        raise UserError(f"input_dir={input_dir} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return [p.relative_to(input_dir).as_posix() for p in found]


def plan_outputs(names: list[str], copies: int, seed: int, boxes: dict[str, tuple] | None = None) -> list[Output]:
    """Every output of a run, in a fixed order: sources sorted, then copies."""
    boxes = boxes or {}
    return [Output(name, k, output_seed(seed, name, k), boxes.get(name, ())) for name in names for k in range(copies)]

