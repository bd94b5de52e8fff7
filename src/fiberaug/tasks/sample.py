"""The sampling task: a synthetic data set from a trained model, written batch by batch, resumably, with a record of
how each image was made (`fiberaug.jobs`: the job in run.json, one manifest line per draw), curated by the filters
of `fiberaug.tasks.curation`.

The data set has `count` positions, each with its class. Every batch draws the first positions still empty, draw i
from the noise of (seed, i); a draw the filters reject leaves its position to a later batch. Without filters draw i
fills position i. A run's batches follow from the records of the earlier ones alone, so a resumed run redraws the
batch it was killed in and goes on exactly as an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from fiberaug.data.images import write_image
from fiberaug.errors import UserError
from fiberaug.files import locked_folder, write_atomic
from fiberaug.imaging import labelled_grid, save_png, to_uint8
from fiberaug.jobs import MANIFEST, Manifest, read_records, start_job, versions
from fiberaug.models import load_generator
from fiberaug.models.base import GenerativeModule
from fiberaug.tasks.curation import Curation, build_curation

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
PREVIEW = ".preview.png"  # hidden, at the top: data=folder, Hugging Face and torchvision ImageFolder all skip it
PREVIEW_IMAGES = 64
#: sample.py's options for how images are drawn; each applies to the models that name it in `sampling_options`.
SAMPLING_OPTIONS = ("sampler", "steps", "eta", "guidance_scale", "prompt", "negative_prompt", "height", "width")
PACKAGES = ("fiberaug", "torch", "pytorch-lightning", "diffusers", "numpy", "pillow")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device}: no CUDA device here; use device=cpu or device=auto")
    return torch.device(device)


def lighten_decoding(model: torch.nn.Module) -> None:
    """A latent model's autoencoder decodes one image at a time (memory bounded whatever `batch_size`), and in
    overlapping tiles where the images are larger than the autoencoder was built for (its `sample_size`)."""
    autoencoder = getattr(model, "autoencoder", None)
    if autoencoder is None:
        return
    autoencoder.enable_slicing()
    if model.hparams.image_size > autoencoder.config.sample_size:
        autoencoder.enable_tiling()
        log.info("decoding in tiles: %d px images, an autoencoder built for %d px", model.hparams.image_size,
                 autoencoder.config.sample_size)


def content_sha256(path: Path) -> str:
    """The SHA-256 of a checkpoint file, or of an export folder's files (their relative names and bytes)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sample(cfg: DictConfig) -> Path:
    """Write the data set to `output_dir` (continuing the same job if it was interrupted); returns that folder."""
    out = Path(cfg.output_dir).expanduser()
    device = resolve_device(cfg.device)
    model = load_generator(cfg.ckpt_path, cfg.get("adapter")).to(device)
    lighten_decoding(model)
    options = _options(cfg, model)
    labels = OmegaConf.to_object(cfg.labels) if OmegaConf.is_config(cfg.labels) else cfg.labels
    count = _count(cfg, model, labels)
    if cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be at least 1")
    if options.get("prompt") and (labels is not None or cfg.get("num_per_class") is not None):
        raise UserError(f"prompt={options['prompt']!r} draws every image from that prompt: leave labels and "
                        "num_per_class unset (or drop prompt to draw the class prompts)")
    label_idx = None if options.get("prompt") else model.label_indices(labels, count)
    settings = {k: v for k, v in {**getattr(model, "sampling", {}), **options}.items() if k in model.sampling_options}
    checkpoint = Path(cfg.ckpt_path).expanduser().resolve()
    adapter = Path(cfg.adapter).expanduser().resolve() if cfg.get("adapter") else None
    curation, filters = build_curation(cfg.filter, model, cfg.ckpt_path)
    job = {
        "tool": "sample", "checkpoint_sha256": content_sha256(checkpoint),
        "adapter_sha256": content_sha256(adapter) if adapter else None, "seed": cfg.seed,
        "labels": labels, "sampling": settings, "batch_size": cfg.batch_size, "filter": filters,
    }
    run = {"job": job, "checkpoint": str(checkpoint), "adapter": str(adapter) if adapter else None,
           "model": type(model).__name__, "class_names": model.class_names, "command": shlex.join(sys.argv),
           "versions": versions(*PACKAGES)}
    rejected_dir = Path(cfg.rejected_dir).expanduser() if cfg.keep_rejected else None
    out.mkdir(parents=True, exist_ok=True)
    with locked_folder(out):
        resumed = start_job(out, run, cfg.overwrite, "sample", lambda r: [r["file_name"]] if r["file_name"] else [],
                            (METADATA, PREVIEW))
        draws = _replay(out) if resumed else []
        before = len(draws)
        provenance = {"checkpoint_sha256": job["checkpoint_sha256"], "model": run["model"], **settings}
        writer = Writer(model, out, rejected_dir, curation, count, label_idx, cfg, options, provenance)
        writer.run(draws, _max_draws(cfg, count))
        kept = sorted((d for d in draws if d["status"] == "ok" and d["index"] < count), key=lambda d: d["index"])
        write_atomic(out / METADATA, b"".join(json.dumps(_metadata(r)).encode() + b"\n" for r in kept))
        _preview(out, kept[:PREVIEW_IMAGES], [] if options.get("prompt") else model.label_names(labels))
    reasons = Counter(d["reason"] for d in draws if d["status"] == "rejected")
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    log.info("sample: %d images in %s; %d drawn (%d now, %d by an earlier run of this job), %d kept, %d rejected%s",
             len(kept), out, len(draws), len(draws) - before, before, len(draws) - sum(reasons.values()),
             sum(reasons.values()), f" ({why})" if why else "")
    if len(kept) < count:
        raise UserError(f"sample: only {len(kept)} of {count} images were accepted in max_attempts={len(draws)} draws "
                        f"({why}); the data set so far is in {out}: rerun with a larger max_attempts to go on, or "
                        "relax the filter")
    return out


def _options(cfg: DictConfig, model: GenerativeModule) -> dict[str, Any]:
    requested = {k: cfg.get(k) for k in SAMPLING_OPTIONS if cfg.get(k) is not None}
    ignored = sorted(set(requested) - set(model.sampling_options))
    if ignored:
        log.info("note: %s do not apply to %s and are ignored", ", ".join(ignored), type(model).__name__)
    return {k: v for k, v in requested.items() if k in model.sampling_options}


def _count(cfg: DictConfig, model: GenerativeModule, labels: Any) -> int:
    """num_samples, or num_per_class times the classes drawn."""
    per_class = cfg.get("num_per_class")
    if per_class is None:
        if cfg.num_samples < 1:
            raise UserError(f"num_samples={cfg.num_samples} must be at least 1")
        return cfg.num_samples
    if not model.num_classes:
        raise UserError(f"num_per_class={per_class}: this model was trained without classes; pass num_samples")
    if not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"num_per_class={per_class!r} must be an integer of at least 1")
    return per_class * len(model.label_names(labels))


def _max_draws(cfg: DictConfig, count: int) -> int:
    attempts = cfg.max_attempts if cfg.max_attempts is not None else 4 * count
    if not isinstance(attempts, int) or attempts < count:
        raise UserError(f"max_attempts={attempts!r} must be an integer of at least the images asked for ({count})")
    return attempts


def _replay(out: Path) -> list[dict[str, Any]]:
    """The draws of an earlier run of the job, in order, up to the first batch it did not finish (killed in it) or
    whose kept files are gone: from there the batches are drawn again, as the uninterrupted run drew them. The
    manifest is cut to match."""
    records = list(read_records(out / MANIFEST))
    per_batch = Counter(r["batch"] for r in records)
    done = 0
    while done < len(records):
        batch = records[done : done + records[done]["batch_draws"]]
        if per_batch[batch[0]["batch"]] != len(batch) or len(batch) != batch[0]["batch_draws"] or not all(
            (out / r["file_name"]).is_file() for r in batch if r["file_name"]
        ):
            break
        done += len(batch)
    if done < len(records):
        write_atomic(out / MANIFEST, b"".join(json.dumps(r).encode() + b"\n" for r in records[:done]))
    return records[:done]


class Writer:
    """Draws batches for the empty positions, judges and writes each image atomically before its manifest line, so
    memory stays one batch whatever the count."""

    def __init__(
        self, model: GenerativeModule, out: Path, rejected_dir: Path | None, curation: Curation, count: int,
        label_idx: torch.Tensor | None, cfg: DictConfig, options: dict[str, Any], provenance: dict[str, Any],
    ) -> None:
        self.model, self.out, self.rejected_dir, self.curation = model, out, rejected_dir, curation
        self.count, self.label_idx, self.cfg, self.options, self.provenance = count, label_idx, cfg, options, provenance

    def run(self, draws: list[dict[str, Any]], max_draws: int) -> None:
        """Go on from `draws` (appending to it) until every position is filled or `max_draws` are drawn."""
        filled = {d["index"] for d in draws if d["status"] == "ok"}
        manifest = Manifest(self.out / MANIFEST)
        try:
            with tqdm(total=self.count, initial=len(filled & set(range(self.count))), desc="sampling",
                      unit="img") as bar:
                while len(draws) < max_draws:
                    empty = [i for i in range(self.count) if i not in filled][: self.cfg.batch_size]
                    if not empty:
                        break
                    empty = empty[: max_draws - len(draws)]
                    for record in self._batch(len(draws), empty):
                        manifest.append(record)
                        draws.append(record)
                        if record["status"] == "ok":
                            filled.add(record["index"])
                            bar.update()
        finally:
            manifest.close()

    def _batch(self, first: int, positions: list[int]) -> list[dict[str, Any]]:
        numbers = range(first, first + len(positions))
        labels = self.label_idx[positions] if self.label_idx is not None else None
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda" and self.cfg.autocast):
            images = to_uint8(self.model.sample_draws(numbers, labels, self.cfg.seed, **self.options))
        verdicts = self.curation.judge(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, labels)
        records = []
        for k, (draw, position, image, (scores, reason)) in enumerate(zip(numbers, positions, images, verdicts)):
            label = self.model.class_names[labels[k]] if labels is not None else None
            folder = f"{label}/" if label is not None else ""
            record = {"index": position, "file_name": None, "label": label, "draw": draw, "seed": self.cfg.seed,
                      **scores, **self.provenance, "batch": first, "batch_draws": len(positions)}
            if reason is None:
                record |= {"status": "ok", "file_name": f"{folder}{position:06d}.png"}
                data = write_image(self.out / record["file_name"], image)
            else:
                record |= {"status": "rejected", "reason": reason}
                data = write_image(self.rejected_dir / f"{folder}{draw:06d}.png", image) if self.rejected_dir else b""
            records.append({**record, "sha256": hashlib.sha256(data).hexdigest() if data else None})
        return records


def _metadata(record: dict[str, Any]) -> dict[str, Any]:
    """A metadata.jsonl row (Hugging Face ImageFolder: `file_name` first, then the image's columns)."""
    row = {k: v for k, v in record.items() if k not in ("status", "batch", "batch_draws")}
    if row["label"] is None:
        del row["label"]
    return row


def _preview(out: Path, rows: list[dict[str, Any]], column_names: list[str]) -> None:
    """The first images as one grid, a column per class drawn (as the training's sample grids)."""
    if rows:
        save_png(labelled_grid(np.stack([_read(out / r["file_name"]) for r in rows]), column_names), out / PREVIEW)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array
