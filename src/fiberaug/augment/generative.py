"""A generative first step of an augment pipeline: Stable Diffusion img2img, or ControlNet from the photo's edges (or a
folder of control maps), on the photo scaled to a working size and brought back to its own, so that its geometry,
masks and boxes still hold. Everything drawn is recorded; the same output seed draws the same image again.

A pipeline file's `generative:` entry (before its classical `transforms:`):

    generative:
      kind: img2img                 # img2img | controlnet
      pipeline: /path/to/stable-diffusion-v1-5
      adapter: null                 # a model=sd_lora run's export/
      strength: [0.25, 0.5, 0.75, 1.0]   # img2img: a number, a list to draw from, or {low: .., high: ..}
      prompt: "a photo of a {class} fibre panel"   # {class}: the source's top folder; captions take precedence
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fiberaug.errors import UserError

KINDS = ("img2img", "controlnet")
MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: Canny thresholds of `edge_iou`, and the tolerance (pixels) within which an edge counts as kept.
EDGE_THRESHOLDS, EDGE_TOLERANCE = (100, 200), 1


@dataclass(frozen=True)
class GenerativeSpec:
    """The `generative:` entry of a pipeline file, checked."""

    pipeline: str
    kind: str = "img2img"
    adapter: str | None = None
    strength: Any = 0.5
    guidance_scale: float = 7.5
    steps: int = 30
    prompt: str = "a photo of a {class}"
    negative_prompt: str = ""
    max_side: int = 1024
    controlnet: str | None = None
    canny: tuple[int, int] = (100, 200)
    control_dir: str | None = None
    min_edge_iou: float | None = None
    offload: bool = False

    @classmethod
    def parse(cls, entry: Any) -> GenerativeSpec:
        if not isinstance(entry, Mapping) or "pipeline" not in entry:
            raise UserError(f"generative: {entry!r} needs at least `pipeline:` (a Stable Diffusion folder)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise UserError(f"generative: unknown keys {unknown}; it takes {', '.join(sorted(known))}")
        spec = cls(**{k: tuple(v) if k == "canny" else v for k, v in entry.items()})
        if spec.kind not in KINDS:
            raise UserError(f"generative.kind={spec.kind!r} is not known; choose one of: {', '.join(KINDS)}")
        if spec.kind == "controlnet" and not spec.controlnet:
            raise UserError("generative.kind=controlnet needs generative.controlnet: a diffusers ControlNet folder")
        if not isinstance(spec.max_side, int) or spec.max_side < 8 or spec.max_side % 8:
            raise UserError(f"generative.max_side={spec.max_side!r} must be a positive multiple of 8")
        spec.draw_strength(np.random.default_rng(0))  # fails early on a bad strength
        return spec

    def draw_strength(self, rng: np.random.Generator) -> float:
        value = self.strength
        if isinstance(value, Mapping) and set(value) == {"low", "high"} and 0 < value["low"] <= value["high"] <= 1:
            return round(float(rng.uniform(value["low"], value["high"])), 4)
        if isinstance(value, (list, tuple)) and value and all(_fraction(v) for v in value):
            return float(value[rng.integers(len(value))])
        if _fraction(value):
            return float(value)
        raise UserError(f"generative.strength={value!r} must be a number in (0, 1], a list of them to draw from, "
                        "or {low: .., high: ..}")


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def working_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) with the long side `max_side`, both multiples of 8 (what the VAE and UNet take)."""
    scale = max_side / max(height, width)
    return tuple(max(8, round(side * scale / 8) * 8) for side in (height, width))  # type: ignore[return-value]


def canny(image: np.ndarray, thresholds: tuple[int, int] = EDGE_THRESHOLDS) -> np.ndarray:
    """Canny edges (bool H×W) of an 8-bit image."""
    gray = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY) \
        if image.shape[2] >= 3 else image[..., 0]
    return cv2.Canny(np.ascontiguousarray(gray), *thresholds) > 0


def edge_iou(source: np.ndarray, output: np.ndarray) -> float:
    """How much of the source's layout an output kept: the IoU of their Canny edges, each widened by
    `EDGE_TOLERANCE` pixels. 1.0 for the same image; 1.0 too for two images without edges."""
    kernel = np.ones((2 * EDGE_TOLERANCE + 1,) * 2, np.uint8)
    a, b = (cv2.dilate(canny(x).astype(np.uint8), kernel) > 0 for x in (source, output))
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else round(float(np.logical_and(a, b).sum() / union), 4)


def model_files(*folders: Path) -> dict[str, str]:
    """SHA-256 of every weight, config and tokenizer file of the model folders used, by path."""
    found = {}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest = hashlib.sha256()
            with open(path, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
            found[str(path)] = digest.hexdigest()
    return found


class GenerativeStep:
    """Draws generative variants of 8-bit photos with a diffusers Stable Diffusion pipeline held in this process."""

    def __init__(self, spec: GenerativeSpec, input_dir: Path, captions: Mapping[str, str]) -> None:
        from fiberaug.nets.stable_diffusion import pipeline_folder

        self.spec, self.input_dir, self.captions = spec, input_dir, captions
        folders = [pipeline_folder(spec.pipeline, "generative.pipeline")]
        for key in ("adapter", "controlnet"):
            value = getattr(spec, key)
            if value and not Path(value).expanduser().is_dir():
                raise UserError(f"generative.{key}={value} is not a folder")
            if value:
                folders.append(Path(value).expanduser().resolve())
        if spec.control_dir and not Path(spec.control_dir).expanduser().is_dir():
            raise UserError(f"generative.control_dir={spec.control_dir} is not a folder")
        self.folders = folders
        self.models = model_files(*(folders[0] / part for part in MODEL_PARTS), *folders[1:])
        self._pipe: Any = None

    @property
    def pipe(self) -> Any:
        """The diffusers pipeline, built on first use (workers that never draw never load it)."""
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    def _load(self) -> Any:
        import torch
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline

        cuda = torch.cuda.is_available()
        dtype = torch.float16 if cuda else torch.float32
        options = {"safety_checker": None, "requires_safety_checker": False, "dtype": dtype}
        if self.spec.kind == "controlnet":
            controlnet = ControlNetModel.from_pretrained(self.spec.controlnet, dtype=dtype)
            pipe = StableDiffusionControlNetPipeline.from_pretrained(self.folders[0], controlnet=controlnet, **options)
        else:
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(self.folders[0], **options)
        if self.spec.adapter:
            pipe.load_lora_weights(self.spec.adapter)
        if cuda:
            pipe.vae.to(torch.float32)  # SD's VAE overflows in float16
        pipe.vae.enable_tiling()  # tiles only where the image is larger than the VAE was built for
        if cuda and self.spec.offload:
            pipe.enable_model_cpu_offload()
        elif cuda:
            pipe.to("cuda")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def check_control_maps(self, sources: list[str]) -> None:
        """Every source must have its map in `control_dir` (same relative path and stem, any image extension)."""
        if self.spec.kind == "controlnet" and self.spec.control_dir:
            missing = [s for s in sources if self.control_map(s) is None]
            if missing:
                raise UserError(f"generative.control_dir={self.spec.control_dir} has no control map for "
                                f"{missing[0]}" + (f" and {len(missing) - 1} more sources" if len(missing) > 1 else "")
                                + " (expected the same relative path and stem, any image extension)")

    def control_map(self, source: str) -> Path | None:
        from fiberaug.data.images import is_image_file

        path = Path(self.spec.control_dir).expanduser() / source
        found = [p for p in path.parent.glob(f"{path.stem}.*") if p.stem == path.stem and is_image_file(p)]
        return found[0] if found else None

    def prompt(self, source: str) -> str:
        """The source's caption where it has one, else the template with its top folder as {class}."""
        name = source.split("/")[0] if "/" in source else ""
        return self.captions.get(source) or " ".join(self.spec.prompt.format_map({"class": name}).split())

    def __call__(self, image: np.ndarray, source: str, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The variant of an 8-bit image (H×W×C, alpha kept as it is) and the record of how it was drawn."""
        import torch
        from PIL import Image

        from fiberaug.data.images import read_image, to_channels

        if image.dtype != np.uint8:
            raise ValueError(f"generative steps take 8-bit images; this one is {image.dtype}")
        spec = self.spec
        alpha = image[..., -1:] if image.shape[2] in (2, 4) else None
        rgb = np.round(to_channels(image, 3) * 255).astype(np.uint8)
        height, width = working_size(*rgb.shape[:2], spec.max_side)
        small = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        rng = np.random.default_rng(seed)
        record: dict[str, Any] = {"kind": spec.kind, "prompt": self.prompt(source),
                                  "negative_prompt": spec.negative_prompt, "guidance_scale": spec.guidance_scale,
                                  "steps": spec.steps, "scheduler": type(self.pipe.scheduler).__name__,
                                  "size": [width, height]}
        options: dict[str, Any] = {}
        if spec.kind == "img2img":
            record["strength"] = options["strength"] = spec.draw_strength(rng)
            options["image"] = Image.fromarray(small)
        else:
            if spec.control_dir:
                mapped = np.round(to_channels(read_image(self.control_map(source)), 3) * 255).astype(np.uint8)
                control = cv2.resize(mapped, (width, height), interpolation=cv2.INTER_AREA)
                record["control"] = {"map": str(self.control_map(source).relative_to(
                    Path(spec.control_dir).expanduser()))}
            else:
                control = np.repeat(canny(small, spec.canny)[..., None].astype(np.uint8) * 255, 3, axis=2)
                record["control"] = {"canny": list(spec.canny)}
            options.update(image=Image.fromarray(control), height=height, width=width)
        device = "cuda" if self.pipe.device.type == "cuda" else "cpu"
        result = self.pipe(prompt=record["prompt"], negative_prompt=spec.negative_prompt or None,
                           num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                           generator=torch.Generator(device).manual_seed(seed), output_type="np", **options).images[0]
        drawn = np.round(np.clip(result, 0, 1) * 255).astype(np.uint8)
        variant = cv2.resize(drawn, rgb.shape[1::-1], interpolation=cv2.INTER_CUBIC)
        record["edge_iou"] = edge_iou(rgb, variant)
        record["models"] = self.models
        if image.shape[2] in (1, 2):
            variant = cv2.cvtColor(variant, cv2.COLOR_RGB2GRAY)[..., None]
        return (np.concatenate([variant, alpha], axis=2) if alpha is not None else variant), record
