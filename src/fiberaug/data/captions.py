"""Per-image captions of a folder, as Hugging Face's ImageFolder reads them: `metadata.jsonl` rows of `file_name`
(relative to the metadata's folder) and `text`, or a `.txt` beside the image."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from fiberaug.errors import UserError

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"


def read_captions(root: Path, paths: Sequence[Path]) -> list[str | None]:
    """Each image's caption, None where it has none: from a `metadata.jsonl` in its folder or one above it (the
    nearest one naming it), else from `<image stem>.txt` beside it."""
    found: dict[Path, str] = {}
    for metadata in sorted(root.rglob(METADATA), key=lambda p: -len(p.parts)):  # the nearest one wins
        for number, line in enumerate(metadata.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row.get("text")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{metadata}:{number} is not a metadata.jsonl row with file_name and text ({exc})"
                                ) from exc
            if isinstance(text, str) and text.strip():
                found.setdefault((metadata.parent / name).resolve(), text.strip())
    captions = []
    for path in paths:
        text = found.get(path.resolve())
        beside = path.with_suffix(".txt")
        if text is None and beside.is_file():
            text = beside.read_text(errors="replace").strip() or None
        captions.append(text)
    counted = sum(c is not None for c in captions)
    if counted:
        log.info("captions: %d of %d images in %s have one (the others get the class prompt)", counted, len(paths),
                 root)
    return captions
