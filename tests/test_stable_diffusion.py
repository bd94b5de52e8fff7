"""model=sd_lora on a tiny Stable Diffusion pipeline the tests build: adapters train and nothing else, prompts by class
template or caption reach the UNet, and plain diffusers draws what FiberAug draws from the exported adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, save, tiny_stable_diffusion
from PIL import Image

from fiberaug.data import FolderDataModule
from fiberaug.errors import UserError
from fiberaug.models import load_generator, read_checkpoint
from fiberaug.nets.stable_diffusion import pipeline_folder
from fiberaug.seeding import derive_seed
from fiberaug.tasks.sample import sample
from fiberaug.tasks.train import train

TEMPLATE = "a photo of a {class} panel"
TINY_SD = [
    "model=sd_lora", "data=folder", "data.image_size=16", "data.resize_policy=random_crop", "data.crop_scale=0.8",
    "data.batch_size=4", "data.val_fraction=0.2", "debug=fast", "trainer.max_steps=6", "model.lr=1e-2",
    "model.lora.r=2", "model.lora.lora_alpha=2", "model.sampling.steps=3", f"model.prompt_template='{TEMPLATE}'",
    "callbacks.sample_grid.num_samples=2", "callbacks.sample_grid.steps=2", "callbacks.metrics.num_samples=4",
    "callbacks.metrics.steps=2", "model.merge_lora=true",
]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _photos(root: Path) -> Path:
    """Two classes of photos of several shapes; captions for two of them (metadata.jsonl beats a .txt)."""
    rng = np.random.default_rng(0)
    for i in range(5):
        for name, channel in (("red", 0), ("blue", 2)):
            image = rng.integers(0, 60, (20 + 2 * i, 24, 3), dtype=np.uint8)
            image[..., channel] += 180
            save(root / name / f"{i}.png", image)
    (root / "red" / "0.txt").write_text("a striped cable\n")
    (root / "red" / "1.txt").write_text("beside, but named in metadata.jsonl too")
    rows = [{"file_name": "red/1.png", "text": "a dotted cable"}, {"file_name": "blue/2.png", "text": "a bare panel"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, bytes]]:
    """One tiny LoRA run through train.py: (pipeline folder, run dir, the pipeline's files before the run)."""
    tmp = tmp_path_factory.mktemp("sd")
    pipeline = tiny_stable_diffusion(tmp)
    before = _files(pipeline)
    run_dir = tmp / "run"
    train(compose_config("train", [*TINY_SD, f"model.pretrained={pipeline}", f"data.root={_photos(tmp / 'photos')}",
                                   "data.cache_dir=null"], run_dir))
    return pipeline, run_dir, before


def test_only_adapters_train_and_checkpoints_hold_only_them(sd_run):
    from diffusers import UNet2DConditionModel

    pipeline, run_dir, before = sd_run
    assert _files(pipeline) == before  # the base is never written
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    keys = set(checkpoint["state_dict"])
    assert keys and all("lora_" in k for k in keys - {"latent_scale"}), sorted(keys)[:5]
    assert checkpoint["fiberaug"]["base"]["path"] == str(pipeline.resolve())
    model = load_generator(run_dir / "checkpoints" / "last.ckpt")
    base = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").state_dict()
    loaded = {k.replace(".base_layer", ""): v for k, v in model.net.unet.state_dict().items() if "lora_" not in k}
    assert loaded.keys() == base.keys() and all(torch.equal(loaded[k], base[k]) for k in base)
    trained = [v for k, v in model.net.unet.state_dict().items() if "lora_B" in k]
    assert trained and all(v.abs().sum() > 0 for v in trained)  # B starts at zero: only training moves it
    assert model.latent_scale.item() == 0.5  # the pipeline's VAE scaling_factor


def test_the_prompt_reaches_the_unet(sd_run):
    _, run_dir, _ = sd_run
    model = load_generator(run_dir / "checkpoints" / "last.ckpt")
    red, blue = (model.sample(1, seed=3, steps=3, prompt=f"a {c} panel") for c in ("red", "blue"))
    assert not torch.allclose(red, blue, atol=1e-3)
    assert torch.equal(red, model.sample(1, seed=3, steps=3, prompt="a red panel"))
    red_class = model.sample(1, labels=["red"], seed=3, steps=3)
    assert torch.allclose(red_class, model.sample(1, seed=3, steps=3, prompt="a photo of a red panel"))


def test_captions_take_precedence_over_the_class_template(sd_run, tmp_path):
    _, run_dir, _ = sd_run
    model = load_generator(run_dir / "checkpoints" / "last.ckpt").train()
    data = FolderDataModule(root=str(_photos(tmp_path / "photos")), image_size=16, batch_size=10, val_fraction=0,
                            cache_dir=None)
    data.setup()
    data.serve_captions()
    dataset = data.train_set
    batch = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch])
    captions = [b[-1] for b in batch]
    seen: list[str] = []
    encode = model.net.encode_prompts
    model.net.encode_prompts = lambda prompts: seen.extend(prompts) or encode(prompts)
    model.hparams.cond_drop_prob = 0.0
    model._loss((images, labels, captions))
    expected = {"red/0.png": "a striped cable", "red/1.png": "a dotted cable", "blue/2.png": "a bare panel"}
    names = [p.relative_to(tmp_path / "photos").as_posix() for p in dataset.items]
    assert seen == [expected.get(name, TEMPLATE.format_map({"class": name.split("/")[0]})) for name in names]


def test_plain_diffusers_draws_what_fiberaug_draws_from_the_exported_adapter(sd_run, tmp_path):
    import diffusers
    from diffusers import StableDiffusionPipeline

    pipeline, run_dir, _ = sd_run
    export = run_dir / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    assert (export / "peft" / "unet" / "adapter_config.json").is_file()
    out = tmp_path / "data"
    sample(compose_config("sample", [f"ckpt_path={export}", f"output_dir={out}", "num_samples=2", "batch_size=2",
                                     "prompt=a dotted cable", "negative_prompt=a bare panel", "guidance_scale=5",
                                     "steps=4", "height=16", "width=24", "seed=7", "filter.max_copy_ratio=null",
                                     "sampler=dpmpp"]))
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["000000.png", "000001.png"]
    assert rows[0]["prompt"] == "a dotted cable" and rows[0]["negative_prompt"] == "a bare panel"
    ours = np.stack([np.asarray(Image.open(out / r["file_name"])) for r in rows]).astype(int)

    def diffusers_draw(adapter: bool, folder: Path = pipeline) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        sampler = json.loads((export / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        pipe.scheduler = getattr(diffusers, sampler).from_pretrained(export, subfolder="scheduler")
        if adapter:
            pipe.load_lora_weights(export)
        return pipe(["a dotted cable"] * 2, negative_prompt=["a bare panel"] * 2, guidance_scale=5,
                    num_inference_steps=4, height=16, width=24, output_type="np",
                    generator=[torch.Generator().manual_seed(derive_seed(7, i)) for i in range(2)]).images

    theirs, base = diffusers_draw(adapter=True), diffusers_draw(adapter=False)
    assert ours.shape == theirs.shape == (2, 16, 24, 3)
    assert np.abs(ours - np.round(theirs * 255)).max() <= 1  # the data set's PNGs
    exact = load_generator(export).sample(2, seed=7, prompt="a dotted cable", negative_prompt="a bare panel",
                                          guidance_scale=5, steps=4, height=16, width=24, sampler="dpmpp")
    exact = ((exact + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert np.abs(exact - theirs).max() < 1e-5
    assert np.abs(exact - base).max() > 1e-4  # the adapter is what makes them agree
    merged = diffusers_draw(adapter=False, folder=export / "merged")  # model.merge_lora=true: the adapter fused
    assert np.abs(merged - theirs).max() < 1e-5


def test_a_folder_that_is_not_a_pipeline_is_refused_naming_what_it_lacks(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"is not a Stable Diffusion pipeline folder: it lacks model_index.json, "
                                        r"vae/, text_encoder/, tokenizer/, scheduler/"):
        pipeline_folder(tmp_path)


def test_8bit_adamw_without_bitsandbytes_is_a_one_line_error():
    import importlib.util

    from fiberaug.models.diffusion import DiffusionModule

    if importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here")
    model = DiffusionModule({"_target_": "fiberaug.nets.ContextUNet", "base_channels": 8, "channel_mults": [1, 2]},
                            image_size=8, channels=1, optimizer="adamw8bit")
    with pytest.raises(UserError, match=r"model.optimizer=adamw8bit needs bitsandbytes, which is not installed"):
        model.configure_optimizers()


def test_text_encoder_lora_trains_exports_and_reloads(tmp_path):
    from fiberaug.models.diffusion import DiffusionModule
    from fiberaug.nets.stable_diffusion import LORA_WEIGHTS

    pipeline = tiny_stable_diffusion(tmp_path)
    lora = {"r": 2, "lora_alpha": 2, "init_lora_weights": "gaussian"}
    model = DiffusionModule({"_target_": "fiberaug.nets.stable_diffusion.StableDiffusionUNet"}, image_size=16,
                            channels=3, class_names=["red", "blue"], pretrained=str(pipeline), prediction_type=None,
                            lora={**lora, "target_modules": ["to_q", "to_v"]},
                            lora_text_encoder={**lora, "target_modules": ["q_proj", "v_proj"]}, lr=0.05)
    before = model.net.encode_prompts(["red"]).detach().clone()
    optimizer = model.configure_optimizers()["optimizer"]
    for _ in range(3):
        model._loss((torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 1]))).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.net.encode_prompts(["red"]).detach()
    assert not torch.allclose(before, after, atol=1e-4)  # the text encoder's adapters trained, not a stale cache
    assert any(k.startswith("net.text_encoder.") and "lora_" in k for k in model.state_dict())
    model.net.save_pretrained(tmp_path / "export", model.noise_scheduler, {"base": model.base_record})
    assert (tmp_path / "export" / LORA_WEIGHTS).is_file() and (tmp_path / "export" / "peft" / "text_encoder").is_dir()
    reloaded = DiffusionModule._from_pipeline(tmp_path / "export", {"base": model.base_record})
    assert torch.allclose(reloaded.net.encode_prompts(["red"]), model.eval().net.encode_prompts(["red"]), atol=1e-5)
