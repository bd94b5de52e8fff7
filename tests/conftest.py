"""Shared fixtures: composed configs, tiny runs through the real scripts, and small image folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A limit for subprocesses that only stops a hung one: far above any normal time, however busy the machine.
HANG_GUARD = 1800

# tests/probes.py's callbacks, for runs of the real scripts: +callbacks.NAME._target_=probes.X
PROBES = {"PYTHONPATH": str(Path(__file__).resolve().parent)}

# A network and run small enough for seconds on two CPU cores, through every real code path.
TINY = [
    "debug=fast",
    "data.image_size=8",
    "data.batch_size=16",
    "model.denoiser.base_channels=8",
    "model.denoiser.channel_mults=[1,2]",
    "model.sampling.steps=4",
    "callbacks.sample_grid.num_samples=4",
]


def compose_config(name: str, overrides: list[str], output_dir: Path | None = None, conf: Path = CONF) -> DictConfig:
    """Compose `<conf>/<name>.yaml` as the scripts would, with the run dir set to `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
            del cfg.hydra  # as in a run: the task sees its config, Hydra's own lives in HydraConfig
    return cfg


def run_script(
    script: str, *overrides: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a top-level script in a fresh interpreter, as a user would (with `env` added to the environment)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=HANG_GUARD,
    )


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The user's cache folder, for this process and the scripts it runs: `data.cache_dir=auto` writes in a temp one."""
    path = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny class-conditional DDPM run through `train.py`, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script("train.py", *TINY, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """A folder with two class sub-folders of mixed modes and formats (and, optionally, a broken file)."""

    def make(broken: bool = True) -> Path:
        rng = np.random.default_rng(0)
        root = tmp_path / "images"
        for i in range(3):
            save(root / "cats" / f"rgb{i}.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
            save(root / "dogs" / f"gray{i}.jpg", rng.integers(0, 255, (24, 24), dtype=np.uint8))
        save(root / "cats" / "alpha.png", rng.integers(0, 255, (16, 16, 4), dtype=np.uint8))
        save(root / "dogs" / "deep16.png", rng.integers(0, 65535, (18, 18), dtype=np.uint16))
        save(root / "dogs" / "scan.tif", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        (root / "dogs" / "notes.txt").write_text("not an image")
        if broken:
            (root / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
        return root

    return make


def augment_config(input_dir: Path, output_dir: Path, *overrides: str) -> DictConfig:
    """augment.py's config (conf/batch/augment.yaml), in this process and with one worker unless overridden."""
    return compose_config("augment", [f"input_dir={input_dir}", f"output_dir={output_dir}", "workers=1", *overrides],
                          conf=CONF / "batch")


def tiny_autoencoder(
    folder: Path, channels: int = 1, scaling_factor: float | None = None, shift_factor: float | None = None
) -> Path:
    """A tiny AutoencoderKL folder (f=2, 4 latent channels, random weights), its config.json with `scaling_factor`
    and `shift_factor` or, where None, without them (as a folder that gives none)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(
            in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=8,
        )
    vae.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))
    return folder


def tiny_stable_diffusion(folder: Path, scaling_factor: float = 0.5) -> Path:
    """A tiny Stable Diffusion pipeline folder (random weights): a `UNet2DConditionModel` with cross-attention, an
    f=2 `AutoencoderKL`, a small `CLIPTextModel` and a `CLIPTokenizer` from vocab and merges files written here (one
    token per character), and SD's scaled-linear DDIM scheduler, saved by `StableDiffusionPipeline.save_pretrained`."""
    import string

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab").mkdir(parents=True, exist_ok=True)
    (folder / "vocab" / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "vocab" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab" / "vocab.json"), str(folder / "vocab" / "merges.txt"),
                              model_max_length=24)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
            norm_num_groups=8, sample_size=16, scaling_factor=scaling_factor,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"
