"""FastGAN's networks in the one GAN module: skip-layer excitation, the self-supervised discriminator's
reconstruction (the critic's loss only), sizes from 64 to 1024, conditional and not, and exact resume."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from fiberaug.errors import UserError
from fiberaug.nets.fastgan import FastGANDiscriminator, FastGANGenerator, SkipExcitation
from fiberaug.tasks.train import train

FASTGAN_TINY = ["model=fastgan", "debug=fast", "data.image_size=64", "data.batch_size=8", "model.generator.width=8",
                "model.discriminator.width=8", "model.latent_dim=8", "callbacks.sample_grid.num_samples=4",
                "trainer.max_steps=6"]


def test_skip_layer_excitation_gates_each_high_resolution_channel_by_the_low_resolution_features():
    torch.manual_seed(0)
    sle = SkipExcitation(low_channels=6, high_channels=4)
    low, high = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 32, 32)
    out = sle(low, high)
    gate = out / high
    assert torch.allclose(gate, gate[..., :1, :1].expand_as(gate), atol=1e-5)  # one weight per channel
    assert ((gate > 0) & (gate < 1)).all()
    other = sle(torch.randn(2, 6, 8, 8), high)
    assert not torch.allclose(other, out)  # the low-resolution features steer it


@pytest.mark.parametrize("size", [64, 128, 256, 512, 1024])
@pytest.mark.parametrize("classes", [0, 3])
def test_shapes_from_64_to_1024_conditional_and_not(size, classes):
    generator = FastGANGenerator(3, size, classes, latent_dim=8, width=8)
    discriminator = FastGANDiscriminator(3, size, classes, width=8)
    labels = torch.tensor([0, 2]) if classes else None
    with torch.no_grad():
        images = generator(torch.randn(2, 8), labels)
        score, loss = discriminator(images, labels, reconstruct=True)
    assert images.shape == (2, 3, size, size) and images.abs().max() <= 1
    assert score.shape == (2,) and loss.ndim == 0
    assert sorted(int(k) * 16 for k in generator.skips) == [r for r in (64, 128, 256, 512, 1024) if r <= size]


def test_sizes_outside_64_to_1024_are_refused():
    with pytest.raises(UserError, match="FastGAN generator: it takes powers of two from 64 to 1024"):
        FastGANGenerator(3, 32)


def test_the_reconstruction_trains_the_decoders_on_a_fixed_batch():
    torch.manual_seed(0)
    discriminator = FastGANDiscriminator(3, 64, width=8)
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4) * 2 - 1, size=64, mode="bilinear")  # smooth
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same quarter every time
        _, loss = discriminator(images, reconstruct=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_the_reconstruction_is_the_critics_loss_only_and_resume_is_exact(tmp_path, monkeypatch):
    calls = {"reconstructions": 0}
    forward = FastGANDiscriminator.forward

    def counting(self, x, labels=None, reconstruct=False):
        calls["reconstructions"] += reconstruct
        return forward(self, x, labels, reconstruct)

    monkeypatch.setattr(FastGANDiscriminator, "forward", counting)
    train(compose_config("train", FASTGAN_TINY, tmp_path / "whole"))
    counters = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)["gan"]
    assert counters["critic_steps"] == counters["generator_steps"] == 3  # hinge: one of each per batch
    assert calls["reconstructions"] == 3  # on the real images of each critic step; the generator's steps use none
    train(compose_config("train", [*FASTGAN_TINY, "trainer.max_steps=4"], tmp_path / "first"))
    resume = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*FASTGAN_TINY, f"ckpt_path={resume}"], tmp_path / "resumed"))
    whole, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)
                      for run in ("whole", "resumed"))
    assert whole["global_step"] == resumed["global_step"] == 6
    assert all(torch.equal(whole["state_dict"][k], v) for k, v in resumed["state_dict"].items())
