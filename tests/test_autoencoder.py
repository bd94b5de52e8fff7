"""The autoencoder: a tiny run through train.py and its export, the discriminator's start, decoder-only fine-tuning,
the adaptive weight, and one-line refusals of what cannot be an autoencoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from diffusers import AutoencoderKL, UNet2DModel
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fiberaug.errors import UserError
from fiberaug.models import load_generator
from fiberaug.models.autoencoder import SCALE_IMAGES, AutoencoderModule, adaptive_weight, psnr
from fiberaug.nets import PatchDiscriminator
from fiberaug.tasks.train import train

# An autoencoder small enough for seconds on two CPU cores: 16×16 digits, f=2, one-layer patch discriminator.
AE_TINY = [
    "model=autoencoder",
    "debug=fast",
    "data.image_size=16",
    "model.vae.block_out_channels=[8,8]",
    "model.vae.norm_num_groups=4",
    "model.vae.layers_per_block=1",
    "model.vae.latent_channels=2",
    "model.discriminator.base_channels=8",
    "model.discriminator.n_layers=1",
    "callbacks.sample_grid.num_samples=4",
]


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _module(ckpt: dict) -> AutoencoderModule:
    model = AutoencoderModule(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def _tiny_module(**options) -> AutoencoderModule:
    """The module of `AE_TINY` for 16×16 gray images, built directly (Hydra would wrap its errors)."""
    config = OmegaConf.to_container(compose_config("train", AE_TINY).model)
    return AutoencoderModule(image_size=16, channels=1, **{k: v for k, v in config.items() if k[0] != "_"} | options)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A tiny run whose discriminator starts at its 4th batch, and the value it returned for `val/psnr`."""
    run_dir = tmp_path_factory.mktemp("autoencoder")
    value = train(compose_config("train", [*AE_TINY, "model.disc_start=3", "optimized_metric=val/psnr"], run_dir))
    return run_dir, value


def test_a_tiny_run_trains_validates_and_exports_a_plain_diffusers_folder(tiny_run):
    tmp_path, value = tiny_run
    cfg = compose_config("train", [*AE_TINY, "model.disc_start=3"])
    ckpt = _checkpoint(tmp_path)
    # Five batches an epoch: batches 1-3 step the autoencoder, 4-7 both networks, so step 11 ends the run.
    assert ckpt["global_step"] == 11 and ckpt["autoencoder"] == {"autoencoder_steps": 7}
    assert ckpt["fiberaug"]["module"] == "fiberaug.models.autoencoder.AutoencoderModule" and ckpt["fiberaug"]["data"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    logged = {"loss/val", "val/psnr", "val/swd", "train/kl", "train/adaptive_weight", "loss/discriminator"}
    assert logged <= set(events.Tags()["scalars"])
    assert value == pytest.approx(events.Scalars("val/psnr")[-1].value)
    # From the discriminator's start on, the autoencoder's loss holds its adversarial term, adaptively weighted.
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in
              ("loss/autoencoder", "train/reconstruction", "train/kl", "train/adaptive_weight", "train/adversarial")}
    assert sorted(logged["train/adversarial"]) == [5, 7, 9, 11]
    for step, gan in logged["train/adversarial"].items():
        rec, kl, weight = (logged[tag][step] for tag in ("train/reconstruction", "train/kl", "train/adaptive_weight"))
        assert weight > 0 and logged["loss/autoencoder"][step] == pytest.approx(rec + 1e-6 * kl + weight * gan)
    assert [e.step for e in events.Images("reconstructions")] == [7, 11]
    assert [p.name for p in (tmp_path / "samples").glob("*.png")] == ["epoch0000-step0000007.png",
                                                                       "epoch0001-step0000011.png"]
    with pytest.raises(UserError, match="holds AutoencoderModule, which does not generate images"):
        load_generator(tmp_path / "checkpoints" / "last.ckpt")

    # The export is a plain diffusers folder that reconstructs as the module does, scaled by its latents' spread.
    export = tmp_path / "export"
    vae = AutoencoderKL.from_pretrained(export).eval()
    model = _module(ckpt)
    datamodule = instantiate(cfg.data, augment=cfg.augment, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    images = datamodule.reference_images("train", SCALE_IMAGES)[0]
    with torch.no_grad():
        assert torch.equal(vae(images[:8]).sample, model.reconstruct(images[:8]))
        latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
    assert vae.config.scaling_factor == pytest.approx(1 / latents.std().item(), rel=1e-5)
    metadata = json.loads((export / "fiberaug.json").read_text())
    assert metadata["f"] == 2 and metadata["scaling_factor"] == vae.config.scaling_factor
    assert metadata["training"]["disc_start"] == 3 and metadata["training"]["autoencoder_steps"] == 7


def test_the_discriminator_is_untouched_before_its_start_step_and_trained_after(tmp_path):
    probe = ["+callbacks.probe._target_=probes.DiscriminatorProbe", f"+callbacks.probe.dirpath={tmp_path}"]
    train(compose_config("train", [*AE_TINY, "model.disc_start=3", "trainer.max_steps=7", *probe], tmp_path))
    batches = torch.load(tmp_path / "discriminator.pt", weights_only=True)
    assert [b["autoencoder_steps"] for b in batches] == [1, 2, 3, 4, 5]
    assert [b["global_step"] for b in batches] == [1, 2, 3, 5, 7]  # one optimizer step per batch, then two
    # Never run before its start (BatchNorm statistics included); then run on reconstructions by the autoencoder's
    # step, on the real batch and the reconstructions by its own.
    assert [b["calls"] for b in batches] == [0, 0, 0, 3, 3]
    assert [b["changed"] for b in batches[:3]] == [[], [], []]
    # (The last bias may keep still: the hinge loss's gradient for it is 0 while all scores lie inside the margin.)
    weights = {k for k, _ in PatchDiscriminator(1, 16, base_channels=8, n_layers=1).named_parameters()
               if k.endswith("weight")}
    assert weights <= set(batches[3]["changed"]) and any("running_mean" in k for k in batches[3]["changed"])


def test_a_run_resumed_across_the_discriminator_start_ends_bit_identical(tmp_path, tiny_run):
    """Stopped at step 5 (the 4th batch, the discriminator's first), resumed to the end: the counters, the random
    streams and both optimizers carry over."""
    overrides = [*AE_TINY, "model.disc_start=3"]
    train(compose_config("train", [*overrides, "trainer.max_steps=5"], tmp_path / "first"))
    resume = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*overrides, f"ckpt_path={resume}"], tmp_path / "resumed"))
    whole, resumed = _checkpoint(tiny_run[0]), _checkpoint(tmp_path / "resumed")
    assert resumed["autoencoder"] == whole["autoencoder"] == {"autoencoder_steps": 7}
    assert all(torch.equal(v, resumed["state_dict"][k]) for k, v in whole["state_dict"].items())
    for opt_whole, opt_resumed in zip(whole["optimizer_states"], resumed["optimizer_states"], strict=True):
        for i, state in opt_whole["state"].items():
            assert all(torch.equal(v, opt_resumed["state"][i][k]) for k, v in state.items())


@pytest.fixture
def pretrained(tmp_path: Path) -> Path:
    """A tiny AutoencoderKL folder, as Stable Diffusion downloads hold one in vae/, with its own scaling factor."""
    vae = _tiny_module().vae
    vae.register_to_config(scaling_factor=0.3)
    vae.save_pretrained(tmp_path / "sd" / "vae")
    return tmp_path / "sd"


def test_decoder_only_fine_tuning_leaves_the_encoder_bit_identical(tmp_path, pretrained):
    overrides = [*AE_TINY, f"model.pretrained={pretrained}", "model.train=decoder", "model.disc_start=2"]
    train(compose_config("train", overrides, tmp_path / "run"))
    before = AutoencoderKL.from_pretrained(pretrained / "vae").state_dict()
    ckpt = _checkpoint(tmp_path / "run")
    after = {k.removeprefix("vae."): v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    optimized = len(ckpt["optimizer_states"][0]["param_groups"][0]["params"])
    assert optimized == len(before) - len(frozen)  # the autoencoder's optimizer holds only what it may change
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("conv_out.weight"))
    assert sum(not torch.equal(before[k], after[k]) for k in trained) > len(trained) // 2
    # The latent space did not move, so the export keeps the pretrained scaling factor.
    exported = AutoencoderKL.from_pretrained(tmp_path / "run" / "export")
    assert exported.config.scaling_factor == 0.3
    assert "kept from model.pretrained" in json.loads((tmp_path / "run" / "export" / "fiberaug.json").read_text())[
        "scaling_factor_from"]
    # The checkpoint rebuilds without the pretrained folder: it records the architecture.
    shutil.rmtree(pretrained)
    model = _module(ckpt)
    assert all(torch.equal(v, after[k]) for k, v in model.vae.state_dict().items())


def test_adaptive_weight_is_the_ratio_of_the_gradient_norms_at_the_last_layer():
    # L = w·a has the gradient a at w: λ = ‖a‖ / (‖b‖ + 1e-4).
    w = torch.tensor([1.0, 2.0, -1.0], requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 0.5, 0.0])
    weight = adaptive_weight(w @ a, (w @ b) * 2, w)
    assert weight.item() == pytest.approx(5 / (1.0 + 1e-4)) and not weight.requires_grad
    assert adaptive_weight(w @ a, (w @ b) * 0, w).item() == pytest.approx(1e4)  # clamped


def test_psnr_in_decibels_on_pixels_in_0_1():
    images = torch.zeros(2, 1, 4, 4)
    # An error of 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, 20 dB; values beyond [-1, 1] are clamped first.
    reconstructions = torch.stack([torch.full((1, 4, 4), 0.2), torch.full((1, 4, 4), -0.2)])
    assert psnr(reconstructions, images).tolist() == pytest.approx([20.0, 20.0])
    assert psnr(torch.full((1, 1, 4, 4), 5.0), torch.ones(1, 1, 4, 4)).item() == pytest.approx(100.0)


def test_patch_discriminator_gives_patch_logits_with_as_many_layers_as_the_image_allows():
    assert PatchDiscriminator(3, 256).forward(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix's 70×70
    assert PatchDiscriminator(3, 24).forward(torch.zeros(1, 3, 24, 24)).shape == (1, 1, 1, 1)
    small = PatchDiscriminator(3, 16, n_layers=3)  # two stride-2 layers: 16 → 4, then 3, then 2
    assert small.forward(torch.zeros(1, 3, 16, 16)).shape == (1, 1, 2, 2)
    with pytest.raises(UserError, match="data.image_size=5 is too small for a patch discriminator: it takes images "
                                        "of at least 6 px"):
        PatchDiscriminator(3, 5)


def test_f4_preset_builds_a_three_level_autoencoder():
    cfg = compose_config("train", ["experiment=fibres128_autoencoder", "data.root=unused"])
    model = instantiate(cfg.model, image_size=128, channels=3)
    assert model.downsampling == 4 and model.vae.config.latent_channels == 3
    with torch.no_grad():
        assert model.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 3, 8, 8)


def _unet_folder(path: Path) -> Path:
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pretrained": "{tmp}/missing"}, "model.pretrained={tmp}/missing is not a folder; pass a diffusers "
                                          "AutoencoderKL folder (config.json with _class_name AutoencoderKL"),
        ({"pretrained": "{tmp}"}, "model.pretrained={tmp} holds no config.json; pass a diffusers AutoencoderKL folder"),
        ({"pretrained": "{unet}"}, "model.pretrained={unet} holds a UNet2DModel, not an AutoencoderKL; pass a "
                                   "diffusers AutoencoderKL folder"),
        ({"train": "decoder"}, "model.train=decoder fine-tunes the decoder of an existing autoencoder: set "
                               "model.pretrained=PATH"),
        ({"train": "encoder"}, "model.train='encoder' is not known; choose one of: all, decoder"),
    ],
    ids=["missing folder", "no config.json", "not an autoencoder", "decoder without pretrained", "unknown train"],
)
def test_what_cannot_be_trained_is_a_one_line_error(tmp_path, options, message):
    unet = _unet_folder(tmp_path / "unet")
    fill = {"tmp": tmp_path / "empty", "unet": unet}
    (tmp_path / "empty").mkdir()
    options = {k: v.format(**fill) for k, v in options.items()}
    with pytest.raises(UserError) as error:
        _tiny_module(**options)
    assert str(error.value).startswith(message.format(**fill)) and "\n" not in str(error.value)
