"""The diffusers UNet2DModel denoiser: training, export, LoRA with PEFT, and sampling from every source."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config, run_script
from diffusers import DDPMPipeline, UNet2DModel

from fiberaug.models import load_generator
from fiberaug.models.diffusion import DiffusionModule
from fiberaug.tasks import run_task
from fiberaug.tasks.train import train

UNET = [
    "model=diffusers",
    *(o for o in TINY if not o.startswith("model.denoiser")),
    "model.denoiser.block_out_channels=[16,32]",
    "model.denoiser.attention=[false,true]",
]
LORA = [*UNET, "model=diffusers_lora", "model.lr=1e-2", "model.lora.r=2", "model.lora.lora_alpha=2"]


@pytest.fixture(scope="session")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unconditional tiny UNet trained through train.py; its export/ is the LoRA base."""
    run_dir = tmp_path_factory.mktemp("unet")
    result = run_script("train.py", *UNET, "data.labels=none", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def lora_run(base_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA on a copy of the base export (deleted afterwards: checkpoints must not need it)."""
    base = tmp_path_factory.mktemp("base") / "export"
    shutil.copytree(base_run / "export", base)
    run_dir = tmp_path_factory.mktemp("lora")
    train(compose_config("train", [*LORA, f"model.pretrained={base}", "model.merge_lora=true"], run_dir))
    shutil.rmtree(base)
    return run_dir


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_export_opens_in_plain_diffusers(base_run):
    export = base_run / "export"
    assert {p.name for p in export.iterdir()} >= {"model_index.json", "unet", "scheduler"}
    pipeline = DDPMPipeline.from_pretrained(str(export))
    images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 8, 8, 1)
    unet = UNet2DModel.from_pretrained(str(export), subfolder="unet")
    trained = {k.removeprefix("net.unet."): v for k, v in _state(base_run / "checkpoints" / "last.ckpt").items()}
    assert all(torch.equal(v, trained[k]) for k, v in unet.state_dict().items())


def test_lora_trains_only_the_adapters(base_run, lora_run):
    base = UNet2DModel.from_pretrained(str(base_run / "export"), subfolder="unet").state_dict()
    tuned = _state(lora_run / "checkpoints" / "last.ckpt")
    prefix = "net.unet.base_model.model."
    frozen = {k.removeprefix(prefix).replace(".base_layer", ""): v for k, v in tuned.items() if "lora_" not in k}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k]) for k in base), "a base weight changed during LoRA training"
    lora_b = [v for k, v in tuned.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "the adapters did not train"

    adapter = (lora_run / "export" / "adapter_model.safetensors").stat().st_size
    full = (base_run / "export" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (lora_run / "export" / "adapter_config.json").is_file()
    assert adapter < 0.2 * full, f"adapter {adapter} B is not small beside the UNet's {full} B"


def test_merged_export_samples_as_base_plus_adapter(base_run, lora_run):
    merged = DiffusionModule.from_export(lora_run / "export" / "merged")
    adapted = DiffusionModule.from_export(base_run / "export", adapter=lora_run / "export")
    base = DiffusionModule.from_export(base_run / "export")
    a, b, c = (m.sample(3, seed=5, steps=4) for m in (merged, adapted, base))
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(b, c, atol=1e-3), "the adapter made no difference"


@pytest.mark.parametrize("source", ["checkpoint", "export", "export+adapter", "lora export"])
def test_sample_script_from_every_source(base_run, lora_run, tmp_path, source):
    args = {
        "checkpoint": [f"ckpt_path={lora_run / 'checkpoints' / 'last.ckpt'}"],
        "export": [f"ckpt_path={base_run / 'export'}"],
        "export+adapter": [f"ckpt_path={base_run / 'export'}", f"adapter={lora_run / 'export'}"],
        "lora export": [f"ckpt_path={lora_run / 'export' / 'merged'}"],
    }[source]
    if source == "checkpoint":  # through the real script once
        result = run_script("sample.py", *args, "num_samples=2", "steps=2", f"output_dir={tmp_path}")
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        from fiberaug.tasks.sample import sample

        sample(compose_config("sample", [*args, "num_samples=2", "steps=2", f"output_dir={tmp_path}"]))
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == [".preview.png", "000000.png", "000001.png"]


def test_class_conditional_export_keeps_class_names(tmp_path):
    model = DiffusionModule(
        denoiser={"_target_": "fiberaug.nets.diffusers_unet.diffusers_unet", "block_out_channels": [16, 32],
                  "attention": [False, False], "norm_num_groups": 8},
        image_size=8, channels=3, class_names=["cat", "dog"],
    )
    model.net.save_pretrained(tmp_path, model.noise_scheduler, model.export_metadata())
    loaded = DiffusionModule.from_export(tmp_path)
    assert loaded.class_names == ["cat", "dog"] and loaded.net.num_classes == 2
    assert loaded.sample(2, labels=["dog"], steps=2).shape == (2, 3, 8, 8)


def test_lora_keeps_adapters_fp32_under_mixed_precision_and_checkpointing(base_run, tmp_path):
    overrides = [*LORA, f"model.pretrained={base_run / 'export'}", "trainer.precision=16",
                 "model.gradient_checkpointing=true", "trainer.max_steps=2"]
    train(compose_config("train", overrides, tmp_path))
    state = _state(tmp_path / "checkpoints" / "last.ckpt")
    assert {v.dtype for k, v in state.items() if "lora_" in k} == {torch.float32}


def test_lora_on_a_random_base_only_when_forced(tmp_path, caplog):
    with pytest.raises(SystemExit, match="error: model.pretrained is not set: LoRA fine-tunes a pretrained UNet"):
        run_task(train, compose_config("train", LORA, tmp_path / "a"))
    forced = [*LORA, "model.lora_on_random_base=true", "trainer.max_steps=1"]
    with caplog.at_level(logging.WARNING):
        train(compose_config("train", forced, tmp_path / "b"))
    assert "LoRA on a randomly initialised UNet" in caplog.text
    assert (tmp_path / "b" / "export" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([*LORA, "model.pretrained=/no/such/export"], "model.pretrained=/no/such/export could not be loaded"),
        ([*TINY, "+model.pretrained=BASE"], "model.pretrained applies to diffusers denoisers"),
        ([*LORA, "model.pretrained=BASE", "data.image_size=16"], "was trained at 8x8; set data.image_size=8"),
    ],
)
def test_bad_pretrained_is_refused(base_run, tmp_path, overrides, message):
    overrides = [o.replace("BASE", str(base_run / "export")) for o in overrides]
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        run_task(train, compose_config("train", overrides, tmp_path))


def test_adapter_with_a_checkpoint_is_refused(lora_run, base_run):
    with pytest.raises(Exception, match="adapter=.* applies to export folders"):
        load_generator(lora_run / "checkpoints" / "last.ckpt", adapter=base_run / "export")
