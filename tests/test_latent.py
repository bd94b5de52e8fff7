"""Latent diffusion: any denoiser on a frozen diffusers AutoencoderKL (tiny ones built here), its latent scale, the
checkpoints that reference the autoencoder, the export that plain diffusers samples, and one-line refusals."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config, tiny_autoencoder
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from hydra.utils import instantiate

from fiberaug.errors import UserError
from fiberaug.models import load_generator
from fiberaug.models.diffusion import DiffusionModule
from fiberaug.nets.autoencoder_kl import folder_sha256, latent_scale
from fiberaug.seeding import derive_seed
from fiberaug.tasks.sample import lighten_decoding
from fiberaug.tasks.train import train

PROBE = ["+callbacks.probe._target_=probes.LatentProbe"]
CONTEXT_UNET = {"_target_": "fiberaug.nets.ContextUNet", "base_channels": 8, "channel_mults": [1, 2]}


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _train(run_dir: Path, autoencoder: Path, *overrides: str) -> dict:
    """A tiny latent DDPM on 8×8 digits through train.py, probed; returns its last checkpoint."""
    probe = [*PROBE, f"+callbacks.probe.dirpath={run_dir}"]
    train(compose_config("train", [*TINY, f"model.autoencoder={autoencoder}", *probe, *overrides], run_dir))
    return _checkpoint(run_dir)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny latent DDPM run on an autoencoder folder without a scaling_factor, and that folder."""
    tmp = tmp_path_factory.mktemp("latent")
    autoencoder = tiny_autoencoder(tmp / "autoencoder")
    _train(tmp / "run", autoencoder)
    return tmp / "run", autoencoder


def test_the_denoiser_learns_latents_and_samples_decode_to_pixels(latent_run):
    run_dir, autoencoder = latent_run
    record = torch.load(run_dir / "latent.pt", weights_only=True)
    # 8×8 digits through an f=2 autoencoder with 4 latent channels: the denoiser sees 4×4×4 latents.
    assert record["net_in"] == record["net_out"] == (16, 4, 4, 4)
    model = load_generator(run_dir / "checkpoints" / "last.ckpt")
    assert model.hparams.channels == 1 and model.hparams.image_size == 8  # the pixel sizes, for grids and metrics
    samples = model.sample(3, seed=1, steps=3)
    assert samples.shape == (3, 1, 8, 8) and samples.abs().max() <= 1
    assert (run_dir / "samples").is_dir() and any((run_dir / "samples").glob("*.png"))


def test_the_autoencoder_is_frozen_and_bit_identical_after_training(latent_run):
    run_dir, autoencoder = latent_run
    record = torch.load(run_dir / "latent.pt", weights_only=True)
    assert not record["autoencoder_training"] and not record["autoencoder_trainable"]
    assert record["optimized"] == record["trainable"] > 0  # the optimizer holds the denoiser's tensors only
    before = AutoencoderKL.from_pretrained(autoencoder).state_dict()
    assert before.keys() == record["autoencoder"].keys()
    assert all(torch.equal(v, record["autoencoder"][k]) for k, v in before.items())
    # Lightning keeps each module's mode through fit; sampling during training and users call train() on the whole.
    model = load_generator(run_dir / "checkpoints" / "last.ckpt").train()
    assert model.net.training and not model.autoencoder.training


def test_the_ema_shares_the_autoencoder_instead_of_copying_it(tmp_path):
    from fiberaug.callbacks.ema import EMA

    model = DiffusionModule(CONTEXT_UNET, image_size=8, channels=1, autoencoder=str(tiny_autoencoder(tmp_path)))
    names = [name for name, _ in model.named_parameters()]
    ema = EMA()
    ema.setup(None, model, "fit")
    average = ema._average_model.module
    assert average.autoencoder is model.autoencoder and average.net is not model.net
    assert [name for name, _ in average.named_parameters()] == [name for name, _ in model.named_parameters()] == names


def test_mixed_precision_and_checkpointing_leave_the_autoencoder_in_float32(tmp_path, monkeypatch):
    """`trainer.precision=16` (float16 on CUDA, bfloat16 on a CPU): the autoencoder still encodes in float32."""
    dtypes = []
    moments = DiffusionModule.posterior_moments
    monkeypatch.setattr(DiffusionModule, "posterior_moments",
                        lambda self, images: dtypes.append(moments(self, images).dtype) or moments(self, images))
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder")
    ckpt = _train(tmp_path / "run", autoencoder, "trainer.precision=16", "model.gradient_checkpointing=true",
                  "trainer.max_steps=3")
    assert ckpt["global_step"] == 3 and set(dtypes) == {torch.float32}
    assert ckpt["hyper_parameters"]["gradient_checkpointing"]
    record = torch.load(tmp_path / "run" / "latent.pt", weights_only=True)
    before = AutoencoderKL.from_pretrained(autoencoder).state_dict()
    assert all(torch.equal(v, record["autoencoder"][k]) for k, v in before.items())
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_checkpoints_reference_the_autoencoder_instead_of_copying_it(latent_run):
    run_dir, autoencoder = latent_run
    ckpt = _checkpoint(run_dir)
    for states in (ckpt["state_dict"], ckpt["current_model_state"]):  # the EMA's average and the raw weights
        assert states and not [k for k in states if k.startswith("autoencoder.")]
    assert ckpt["fiberaug"]["autoencoder"] == {"path": str(autoencoder.resolve()), "sha256": folder_sha256(autoencoder)}
    assert ckpt["hyper_parameters"]["autoencoder"] == str(autoencoder.resolve())


def test_the_latent_scale_is_estimated_from_the_training_images_when_the_folder_gives_none(latent_run):
    run_dir, autoencoder = latent_run
    cfg = compose_config("train", TINY)
    datamodule = instantiate(cfg.data, augment=cfg.augment, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    images = datamodule.reference_images("train", 256)[0]
    expected = latent_scale(AutoencoderKL.from_pretrained(autoencoder), images)
    assert _checkpoint(run_dir)["state_dict"]["latent_scale"].item() == pytest.approx(expected, rel=1e-6)


def test_a_resumed_run_reuses_the_recorded_scale(tmp_path, monkeypatch):
    estimates = []
    estimate = DiffusionModule.estimate_latent_scale
    monkeypatch.setattr(DiffusionModule, "estimate_latent_scale", lambda self: estimates.append(1) or estimate(self))
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder")
    first = _train(tmp_path / "first", autoencoder, "trainer.max_steps=2")
    assert len(estimates) == 1
    resumed = _train(tmp_path / "resumed", autoencoder, "trainer.max_steps=4",
                     f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    assert len(estimates) == 1 and resumed["global_step"] == 4
    assert torch.equal(resumed["state_dict"]["latent_scale"], first["state_dict"]["latent_scale"])


def test_the_folders_scaling_and_shift_factors_are_used_when_it_gives_them(tmp_path, monkeypatch):
    monkeypatch.setattr(DiffusionModule, "estimate_latent_scale", lambda self: pytest.fail("estimated"))
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder", scaling_factor=0.5, shift_factor=0.1)
    ckpt = _train(tmp_path / "run", autoencoder, "trainer.max_steps=1")
    assert ckpt["state_dict"]["latent_scale"].item() == 0.5
    model = DiffusionModule(CONTEXT_UNET, image_size=8, channels=1, autoencoder=str(autoencoder))
    vae, images = AutoencoderKL.from_pretrained(autoencoder), torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
        assert torch.allclose(model.encode(images, torch.Generator().manual_seed(0)), (latents - 0.1) * 0.5)
        decoded = vae.decode(latents / 0.5 + 0.1).sample.clamp(-1, 1)
        assert torch.allclose(model.decode(latents), decoded, atol=1e-6)


UNET = ["model=diffusers", "model.denoiser.block_out_channels=[16,32]", "model.denoiser.attention=[false,true]"]


def test_the_export_reproduces_fiberaugs_samples_in_plain_diffusers(tmp_path):
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder")
    overrides = [*UNET, "data.labels=none"]
    train(compose_config("train", [*(o for o in TINY if not o.startswith("model.denoiser")), *overrides,
                                   f"model.autoencoder={autoencoder}"], tmp_path / "run"))
    export = tmp_path / "run" / "export"
    assert {p.name for p in export.iterdir()} >= {"unet", "scheduler", "vae", "fiberaug.json"}
    metadata = json.loads((export / "fiberaug.json").read_text())
    assert metadata["autoencoder"]["sha256"] == folder_sha256(autoencoder)
    fiberaug = DiffusionModule.from_export(export).sample(2, seed=3, steps=4, sampler="ddim")
    checkpoint = load_generator(tmp_path / "run" / "checkpoints" / "last.ckpt").sample(2, seed=3, steps=4,
                                                                                      sampler="ddim")
    assert fiberaug.shape == (2, 1, 8, 8) and torch.allclose(fiberaug, checkpoint, atol=1e-5)

    # Plain diffusers: the UNet and the scheduler denoise latents with DDIM, the autoencoder decodes latents / scale.
    unet = UNet2DModel.from_pretrained(export, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(export, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(export, subfolder="vae").eval()
    assert vae.config.scaling_factor == pytest.approx(metadata["autoencoder"]["scaling_factor"])
    scheduler.set_timesteps(4)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(3, i)))
                           for i in range(2)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            prediction = unet(latents, t).sample
            latents = scheduler.step(prediction, t, latents, eta=0.0, use_clipped_model_output=True).prev_sample
        images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.allclose(images, fiberaug, atol=1e-5)


def _error(**options) -> str:
    with pytest.raises(UserError) as error:
        DiffusionModule(CONTEXT_UNET, **{"image_size": 8, "channels": 1} | options)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_what_cannot_serve_as_the_autoencoder_is_a_one_line_error(tmp_path):
    unet = tmp_path / "unet"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(unet)
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder")
    assert _error(autoencoder=str(tmp_path / "missing")).startswith(
        f"model.autoencoder={tmp_path / 'missing'} is not a folder; pass a diffusers AutoencoderKL folder")
    assert _error(autoencoder=str(unet)).startswith(
        f"model.autoencoder={unet} holds a UNet2DModel, not an AutoencoderKL; pass a diffusers AutoencoderKL folder")
    assert _error(autoencoder=str(autoencoder), channels=3) == (
        f"model.autoencoder={autoencoder} takes 1 channels, the data has 3: set data.channels=1")
    assert _error(autoencoder=str(autoencoder), image_size=9) == (
        f"data.image_size=9 does not fit model.autoencoder={autoencoder} (f=2): it takes multiples of 2")


def test_a_checkpoint_names_a_changed_or_missing_autoencoder(tmp_path, caplog):
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder", scaling_factor=1.0)
    _train(tmp_path / "run", autoencoder, "trainer.max_steps=1")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.WARNING):
        load_generator(ckpt)
    assert "changed" not in caplog.text
    config = json.loads((autoencoder / "config.json").read_text())
    (autoencoder / "config.json").write_text(json.dumps(config | {"scaling_factor": 2.0}))
    with caplog.at_level(logging.WARNING):
        load_generator(ckpt)
    warning = f"model.autoencoder={autoencoder.resolve()} changed since this checkpoint was saved (sha256 "
    assert warning in caplog.text and len([r for r in caplog.records if warning in r.message]) == 1
    shutil.rmtree(autoencoder)
    with pytest.raises(UserError, match=f"^model.autoencoder={autoencoder.resolve()} is not a folder; pass a "):
        load_generator(ckpt)


@pytest.mark.parametrize(("image_size", "tiled"), [(8, False), (16, True)])
def test_sampling_decodes_one_image_at_a_time_and_tiles_images_larger_than_the_autoencoders(
    tmp_path, image_size, tiled
):
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder", scaling_factor=1.0)  # built for 8 px
    model = DiffusionModule(CONTEXT_UNET, image_size=image_size, channels=1, autoencoder=str(autoencoder))
    lighten_decoding(model)
    assert model.autoencoder.use_slicing and model.autoencoder.use_tiling == tiled
