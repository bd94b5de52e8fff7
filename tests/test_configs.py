"""Every option of every config group composes, and what it describes can be built."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONF, compose_config, tiny_autoencoder, tiny_stable_diffusion
from hydra.utils import instantiate
from omegaconf import DictConfig

from fiberaug.data import build_transforms, sized_pipeline
from fiberaug.tasks.train import loss_option


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _build_training_objects(cfg: DictConfig) -> None:
    dm = instantiate(cfg.data, augment=cfg.augment, _recursive_=False)
    model = instantiate(
        cfg.model, image_size=dm.image_size, channels=dm.channels, class_names=["a", "b"], **loss_option(cfg)
    )
    assert getattr(model, "num_classes", 2) == 2  # an autoencoder has no classes
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        return  # composes here; builds only where there is a GPU
    instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


GROUPS = ("data", "model", "model/denoiser", "trainer", "logger", "callbacks", "experiment", "hparams_search", "debug")
# What some options need besides themselves: a folder, or a base for LoRA (here forced onto a random one).
NEEDS = {
    "data=folder": ["data.root=unused"],
    "model=diffusers_lora": ["model.lora_on_random_base=true"],
    "experiment=fibres64_ddpm": ["data.root=unused"],
    "experiment=fibres128_ddpm": ["data.root=unused"],
    "experiment=fibres64_gan": ["data.root=unused"],
    "experiment=fibres128_gan": ["data.root=unused"],
    "model=fastgan": ["data.image_size=64"],
    "experiment=fibres64_fastgan": ["data.root=unused"],
    "experiment=fibres256_fastgan": ["data.root=unused"],
    "experiment=fibres128_unet": ["data.root=unused"],
    "experiment=fibres128_lora": ["data.root=unused", "model.lora_on_random_base=true"],
    "experiment=fibres128_autoencoder": ["data.root=unused"],
    "experiment=fibres128_ldm": ["data.root=unused", "model.autoencoder={autoencoder}"],
    "experiment=fibres256_ldm": ["data.root=unused", "model.autoencoder={autoencoder}"],
    "experiment=fibres512_ldm": ["data.root=unused", "model.autoencoder={autoencoder}"],
    "model=sd_lora": ["model.pretrained={pipeline}", "data.channels=3", "data.image_size=16"],
    "model/denoiser=stable_diffusion": ["+model.pretrained={pipeline}", "model.prediction_type=null", "data.channels=3",
                                        "data.image_size=16"],
    "experiment=sd15_lora": ["data.root=unused", "model.pretrained={pipeline}"],
}


def test_groups_have_options():
    for group in (*GROUPS, "augment", "loss", "paths", "hydra"):
        assert _options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize(
    "override",
    [f"{group}={option}" for group in GROUPS for option in _options(group)]
    + [f"model=gan loss={option}" for option in _options("loss")]
    + ["~logger", "~callbacks.ema"],
)
def test_every_group_option_composes_and_builds(tmp_path, override):
    autoencoder = tmp_path / "autoencoder"  # a tiny RGB one (f=2), built only where an option needs one
    pipeline = tmp_path / "sd" / "pipeline"  # likewise a tiny Stable Diffusion
    needs = [need.format(autoencoder=autoencoder, pipeline=pipeline) for need in NEEDS.get(override, [])]
    if any(str(autoencoder) in need for need in needs):
        tiny_autoencoder(autoencoder, channels=3)
    if any(str(pipeline) in need for need in needs):
        tiny_stable_diffusion(tmp_path / "sd")
    cfg = compose_config("train", [*override.split(), *needs], tmp_path)
    _build_training_objects(cfg)


@pytest.mark.parametrize("option", _options("augment"))
def test_every_augment_pipeline_builds_and_keeps_the_size(option, tmp_path):
    cfg = compose_config("train", [f"augment={option}"], tmp_path)
    assert isinstance(build_transforms(cfg.augment), list)
    pipeline = sized_pipeline(16, "random_crop", 0.5, cfg.augment, seed=0)
    image = np.random.default_rng(0).random((40, 50, 3), dtype=np.float32)
    assert pipeline(image=image)["image"].shape == (16, 16, 3)


def test_sample_config_composes():
    cfg = compose_config("sample", ["ckpt_path=x.ckpt", "labels=[1,cat]"])
    assert cfg.labels == [1, "cat"] and cfg.sampler is None


def test_slurm_launcher_config_extends_the_plugins_own():
    cfg = compose_config("train", ["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.signal_delay_s == 120  # ours, and the plugin's default
    with pytest.raises(Exception, match="partiton"):
        compose_config("train", ["hydra/launcher=submitit_slurm", "hydra.launcher.partiton=gpu"])


@pytest.mark.parametrize("preset", ["fibres256_ldm", "fibres512_ldm"])
def test_latent_presets_say_what_to_pass_without_an_autoencoder(tmp_path, preset):
    from fiberaug.tasks import run_task
    from fiberaug.tasks.train import train

    with pytest.raises(SystemExit, match=r"error: model.autoencoder is not set: pass model.autoencoder=PATH, an "
                                         r"AutoencoderKL folder \(train one with experiment=fibres128_autoencoder"):
        run_task(train, compose_config("train", [f"experiment={preset}", f"data.root={tmp_path}"], tmp_path))
