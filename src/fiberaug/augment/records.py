"""augment.py's records in the job folder's manifest (`fiberaug.jobs`): one line per output, and what an earlier
run of the same job already made."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fiberaug import jobs
from fiberaug.augment.plan import Output
from fiberaug.errors import UserError
from fiberaug.jobs import MANIFEST, RUN_FILE, file_sha256, read_records

# Rebuilt from the manifest at the end of every run.
PRODUCTS = ("contact_sheet.png", "annotations.json")


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
    """Make output_dir ready for an augment job (see `fiberaug.jobs.start_job`); returns what an earlier run of the
    same job already made."""
    resumed = jobs.start_job(output_dir, run, overwrite, "augment", record_files, PRODUCTS)
    return latest_records(output_dir) if resumed else {}


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
