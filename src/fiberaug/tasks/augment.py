"""The batch augmentation task: every image of a folder augmented `copies` times, each output recorded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
from omegaconf import DictConfig
from tqdm import tqdm

from fiberaug.augment.annotations import Annotations, coco_document, read_coco
from fiberaug.augment.generative import GenerativeSpec, GenerativeStep
from fiberaug.augment.parallel import ordered_map
from fiberaug.augment.plan import Output, check_folders, plan_outputs, sources
from fiberaug.augment.records import Done, replay_outputs, start_job
from fiberaug.augment.sheet import contact_sheet
from fiberaug.augment.worker import Augmenter
from fiberaug.data.captions import read_captions
from fiberaug.data.images import write_image
from fiberaug.data.pipelines import build_transforms, load_spec, resolve_pipeline
from fiberaug.errors import UserError
from fiberaug.files import locked_folder, write_atomic
from fiberaug.jobs import MANIFEST, Manifest, read_records, versions

log = logging.getLogger(__name__)

AUGMENT_PACKAGES = ("fiberaug", "albumentations", "albucore", "numpy", "pillow")


@dataclass
class Summary:
    """What a run did. `failures`: the reason for each failed source; `differ`: replayed outputs whose bytes changed."""

    planned: int
    written: int = 0
    skipped: int = 0
    failed: int = 0
    dropped: int = 0  # generative variants whose edge_iou fell below min_edge_iou
    failures: dict[str, str] = field(default_factory=dict)
    differ: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.differ else 0

    def fail(self, source: str, reason: str | None) -> None:
        self.failed += 1
        self.failures.setdefault(source, reason or "unknown")


def augment(cfg: DictConfig) -> Summary:
    """Augment input_dir into output_dir, or replay a manifest there; returns the summary it also logs."""
    start = time.perf_counter()
    input_dir, output_dir = check_folders(cfg.input_dir, cfg.output_dir)
    annotations = Annotations.configure(input_dir, cfg.mask_dir, cfg.yolo_dir, cfg.coco)
    categories, boxes = read_coco(cfg.coco) if cfg.coco else ([], {})
    spec, settings, outputs, recorded = _plan(cfg, input_dir, output_dir, annotations, boxes)
    _check_unique(outputs, annotations)
    generative = _generative_step(spec, input_dir, outputs)
    run = _run_file(cfg, spec, input_dir, annotations, settings, generative)
    if recorded not in (None, run["job"]["pipeline_sha256"]):
        log.warning("the pipeline serialises differently with the libraries here (%s): outputs may differ",
                    ", ".join(f"{k} {v}" for k, v in run["versions"].items()))

    output_dir.mkdir(parents=True, exist_ok=True)
    with locked_folder(output_dir):
        done = start_job(output_dir, run, cfg.overwrite)
        make = partial(Augmenter, spec, input_dir, output_dir, annotations, settings["jpeg_quality"], generative)
        workers = settings["workers"]
        if generative is not None and workers > 1:
            log.info("a generative step runs in this process, which holds the model (and the GPU): workers=1")
            workers = 1
        summary = _make_outputs(outputs, done, make, workers, input_dir, output_dir)
        if cfg.coco:
            latest = {record["output"]: record for record in read_records(output_dir / MANIFEST)}
            document = coco_document(categories, (latest[out.image] for out in outputs if out.image in latest))
            write_atomic(output_dir / "annotations.json", json.dumps(document, indent=1).encode())
        if cfg.contact_sheet:
            shown = [out.source for out in outputs]
            sheet = contact_sheet(input_dir, output_dir, shown, settings["copies"], cfg.contact_sheet)
            write_image(output_dir / "contact_sheet.png", sheet)
    summary.seconds = time.perf_counter() - start
    _report(summary, output_dir)
    return summary


def _plan(
    cfg: DictConfig, input_dir: Path, output_dir: Path, annotations: Annotations, boxes: dict[str, tuple]
) -> tuple[Any, dict[str, Any], list[Output], str | None]:
    """The pipeline spec, settings and outputs of the run, and the pipeline hash a replayed job recorded."""
    settings = _settings(cfg)
    if not cfg.replay:
        spec = load_spec(resolve_pipeline(cfg.augment))
        names = sources(input_dir, annotations.excluded(input_dir))
        return spec, settings, plan_outputs(names, settings["copies"], settings["seed"], boxes), None
    if Path(cfg.replay).resolve().parent == output_dir:
        raise UserError(f"replay={cfg.replay} is output_dir's own manifest; replay into another output_dir")
    original, outputs = replay_outputs(Path(cfg.replay))
    settings.update({key: original["job"][key] for key in ("seed", "copies", "jpeg_quality")})
    outputs = [replace(out, boxes=boxes.get(out.source, ())) for out in outputs]
    return original["spec"], settings, outputs, original["job"]["pipeline_sha256"]


def _settings(cfg: DictConfig) -> dict[str, Any]:
    """The numeric options, checked; `workers` null becomes the number of CPU cores this process may use."""
    bounds = {"copies": (1, None), "seed": (0, None), "workers": (0, None), "jpeg_quality": (1, 100),
              "contact_sheet": (0, None)}
    settings = {key: cfg[key] for key in bounds}
    if settings["workers"] is None:
        settings["workers"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for key, (low, high) in bounds.items():
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            raise UserError(f"{key}={value} must be an integer from {low}" + (f" to {high}" if high else " up"))
    return settings


def _generative_step(spec: Any, input_dir: Path, outputs: list[Output]) -> GenerativeStep | None:
    """The pipeline's generative first step (checked, its model files hashed, its control maps found), or None."""
    if not isinstance(spec, dict) or "generative" not in spec:
        return None
    names = list(dict.fromkeys(out.source for out in outputs))
    captions = read_captions(input_dir, [input_dir / name for name in names])
    step = GenerativeStep(GenerativeSpec.parse(spec["generative"]), input_dir,
                          {name: text for name, text in zip(names, captions, strict=True) if text})
    step.check_control_maps(names)
    return step


def _check_unique(outputs: list[Output], annotations: Annotations) -> None:
    """Refuse a plan in which two sources would write the same file (an input folder named like `masks/`)."""
    writer: dict[str, str] = {}
    for out in outputs:
        names = [out.image]
        names += [annotations.mask_output(out.source, out.copy)] if annotations.mask_dir else []
        names += [annotations.labels_output(out.source, out.copy)] if annotations.yolo_dir else []
        for name in names:
            if writer.setdefault(name, out.source) != out.source:
                raise UserError(f"{writer[name]} and {out.source} would both be written to {name}; rename one of them")


def _run_file(
    cfg: DictConfig, spec: Any, input_dir: Path, annotations: Annotations, settings: dict,
    generative: GenerativeStep | None = None,
) -> dict[str, Any]:
    """run.json: `job` identifies the job (a rerun with another job is refused), the rest documents it."""
    try:
        pipeline = A.to_dict(A.Compose(build_transforms(spec)))
    except NotImplementedError as exc:
        raise UserError(f"augment={cfg.augment}: albumentations cannot serialise this pipeline ({exc})") from exc
    digest = hashlib.sha256(json.dumps(pipeline, sort_keys=True).encode()).hexdigest()
    folders = {"mask_dir": annotations.mask_dir, "yolo_dir": annotations.yolo_dir,
               **{key: Path(cfg[key]).resolve() if cfg[key] else None for key in ("coco", "replay")}}
    job = {
        "input_dir": str(input_dir),
        "pipeline_sha256": digest,
        **{key: settings[key] for key in ("seed", "copies", "jpeg_quality")},
        **{key: str(path) if path else None for key, path in folders.items()},
    }
    if generative is not None:  # its settings and the hash of every model file it uses
        job["generative"] = {**spec["generative"], "models": generative.models}
    return {
        "job": job, "pipeline": pipeline, "spec": spec, "command": shlex.join(sys.argv),
        "versions": {**versions(*AUGMENT_PACKAGES), "opencv": cv2.__version__},
    }


def _make_outputs(
    outputs: list[Output], done: dict[str, Done], make: Any, workers: int, input_dir: Path, output_dir: Path
) -> Summary:
    """Make every output not already done, appending each record to the manifest as it completes."""
    summary = Summary(planned=len(outputs))
    todo = []
    for out in outputs:
        previous = done.get(out.image)
        if previous is None or not previous.holds(input_dir / out.source, output_dir):
            todo.append(out)
        elif previous.status == "ok":
            summary.skipped += 1
        elif previous.status == "dropped":
            summary.dropped += 1
        else:
            summary.fail(out.source, previous.error)
    manifest = Manifest(output_dir / MANIFEST)
    try:
        with tqdm(total=len(outputs), initial=len(outputs) - len(todo), desc="augment", unit="image") as bar:
            for out, record in zip(todo, ordered_map(make, todo, workers), strict=True):
                manifest.append(record)
                if record["status"] == "dropped":
                    summary.dropped += 1
                elif record["status"] != "ok":
                    summary.fail(out.source, record["error"])
                else:
                    summary.written += 1
                    if out.expected_sha256 not in (None, record["output_sha256"]):
                        summary.differ.append(out.image)
                bar.update()
    except BrokenProcessPool as exc:
        raise UserError("a worker process died (out of memory, or a decoder crashed on a file); the finished "
                        "outputs are recorded: rerun the same command to continue") from exc
    finally:
        manifest.close()
    return summary


def _report(summary: Summary, output_dir: Path) -> None:
    rate = summary.written / summary.seconds if summary.seconds else 0.0
    log.info("augment: %d written, %d already done, %d failed%s (of %d outputs) in %.1f s, %.1f outputs/s -> %s",
             summary.written, summary.skipped, summary.failed,
             f", {summary.dropped} dropped (edge_iou below min_edge_iou)" if summary.dropped else "",
             summary.planned, summary.seconds, rate, output_dir)
    for source, reason in list(summary.failures.items())[:20]:
        log.info("  failed %s: %s", source, reason)
    if len(summary.failures) > 20:
        log.info("  and %d more sources; the manifest has every reason (status: error)", len(summary.failures) - 20)
    if summary.differ:
        log.warning("replay: %d outputs differ from the manifest's output_sha256, e.g. %s",
                    len(summary.differ), ", ".join(summary.differ[:5]))
