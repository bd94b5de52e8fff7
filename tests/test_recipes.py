"""Small-data training recipes: DiffAugment, spectral norm and R1 for the GAN; v-prediction and Min-SNR-γ for
diffusion. Each against its definition, then through short training runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fiberaug.errors import UserError
from fiberaug.nets import Discriminator, Generator
from fiberaug.nets.diffaugment import (
    DiffAugment,
    brightness,
    contrast,
    cutout,
    random_color,
    random_cutout,
    random_translation,
    saturation,
    translate,
)

# --- DiffAugment: each op against its definition --------------------------------------------------------------


def test_translate_moves_content_and_fills_with_zeros():
    x = torch.arange(1.0, 2 * 36 + 1).view(2, 1, 6, 6)  # no zeros anywhere
    out = translate(x, dy=torch.tensor([1, -2]), dx=torch.tensor([-2, 0]))
    assert torch.equal(out[0, :, 1:, :4], x[0, :, :5, 2:])  # down 1, left 2
    assert (out[0, :, 0] == 0).all() and (out[0, :, :, 4:] == 0).all()
    assert torch.equal(out[1, :, :4], x[1, :, 2:]) and (out[1, :, 4:] == 0).all()  # up 2


def test_cutout_zeroes_a_rectangle_clipped_at_the_border():
    out = cutout(torch.ones(2, 3, 8, 8), top=torch.tensor([1, -2]), left=torch.tensor([2, 5]), height=4, width=4)
    expected = torch.ones(2, 3, 8, 8)
    expected[0, :, 1:5, 2:6] = 0
    expected[1, :, 0:2, 5:8] = 0  # rows -2..1 and columns 5..8, inside the image
    assert torch.equal(out, expected)


def test_colour_ops_change_the_statistics_as_stated():
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    delta, factor = torch.tensor([0.3, -0.2]), torch.tensor([0.5, 1.5])
    assert torch.allclose(brightness(x, delta), x + delta.view(2, 1, 1, 1))
    pixel_mean = x.mean(1, keepdim=True)
    saturated = saturation(x, factor)
    assert torch.allclose(saturated.mean(1, keepdim=True), pixel_mean, atol=1e-6)  # each pixel's gray level kept
    assert torch.allclose(saturated - pixel_mean, (x - pixel_mean) * factor.view(2, 1, 1, 1), atol=1e-6)
    contrasted = contrast(x, factor)
    assert torch.allclose(contrasted.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(contrasted.std((1, 2, 3)), x.std((1, 2, 3)) * factor, atol=1e-6)
    gray = x[:, :1]
    assert torch.equal(saturation(gray, factor), gray)  # one channel: saturation is the identity


def test_random_translation_shifts_each_image_by_at_most_an_eighth():
    torch.manual_seed(0)
    x = torch.arange(1.0, 16 * 16 + 1).view(1, 1, 16, 16).expand(64, 1, 16, 16)
    out = random_translation(x)
    shifts = set()
    for image in out[:, 0]:
        rows, cols = (image > 0).any(1).nonzero(), (image > 0).any(0).nonzero()
        dy = int(rows[0]) if rows[0] > 0 else int(rows[-1]) - 15
        dx = int(cols[0]) if cols[0] > 0 else int(cols[-1]) - 15
        assert torch.equal(image, translate(x[:1], torch.tensor([dy]), torch.tensor([dx]))[0, 0])
        shifts.add((dy, dx))
    assert {max(abs(dy), abs(dx)) for dy, dx in shifts} == {0, 1, 2}  # 16/8 = 2 pixels, drawn per image


def test_random_cutout_zeroes_a_half_size_square_per_image():
    torch.manual_seed(0)
    out = random_cutout(torch.ones(64, 1, 16, 16))[:, 0]
    positions = set()
    for image in out:
        rows, cols = (image == 0).any(1).nonzero().flatten(), (image == 0).any(0).nonzero().flatten()
        assert (image == 0).sum() == len(rows) * len(cols)  # one rectangle
        for hit in (rows, cols):  # 8 wide, or cut by the border
            assert len(hit) == 8 or (len(hit) < 8 and (hit[0] == 0 or hit[-1] == 15))
        positions.add((int(rows[0]), int(cols[0])))
    assert len(positions) > 32  # each image draws its own square


def test_random_color_stays_in_the_reference_ranges():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    gray_pixels = torch.randn(256, 1, 4, 4, generator=g).expand(256, 3, 4, 4)  # channels equal: no saturation
    out = random_color(gray_pixels)
    shift = out.mean((1, 2, 3)) - gray_pixels.mean((1, 2, 3))
    scale = out.std((1, 2, 3)) / gray_pixels.std((1, 2, 3))
    assert shift.min() >= -0.5 and shift.max() <= 0.5 and shift.max() - shift.min() > 0.9  # brightness ±0.5
    assert scale.min() >= 0.5 and scale.max() < 1.5 and scale.max() - scale.min() > 0.9  # contrast ×[0.5, 1.5)

    colour = torch.randn(256, 3, 4, 4, generator=g)
    out = random_color(colour)
    chroma = lambda x: (x - x.mean(1, keepdim=True)).std((1, 2, 3))  # noqa: E731
    luma = lambda x: x.mean(1).std((1, 2))  # noqa: E731
    saturation_factor = (chroma(out) / chroma(colour)) / (luma(out) / luma(colour))  # contrast cancels
    assert saturation_factor.min() >= 0 and saturation_factor.max() < 2 and saturation_factor.max() > 1.9


def test_diffaugment_is_differentiable_through_to_the_generator():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    augment = DiffAugment("color,translation,cutout")
    weights = torch.randn(4, 3, 16, 16)
    (augment(x) * weights).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and not torch.equal(x.grad, weights)

    for channels, num_classes in [(1, 2), (3, 0)]:  # grayscale conditional, colour unconditional
        gen = Generator(channels, image_size=16, num_classes=num_classes, latent_dim=8, base_channels=8)
        disc = Discriminator(channels, image_size=16, num_classes=num_classes, base_channels=8)
        labels = torch.tensor([0, 1, 0, 1]) if num_classes else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fake = gen(torch.randn(4, 8), labels)
            augmented = augment(fake)
            disc(augmented, labels).float().mean().backward()
        assert augmented.dtype == fake.dtype == torch.bfloat16
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_diffaugment_policy_is_parsed_and_checked():
    assert DiffAugment(" color, cutout ").policy == DiffAugment(["color", "cutout"]).policy == ("color", "cutout")
    x = torch.randn(2, 1, 8, 8)
    assert DiffAugment(None)(x) is x and DiffAugment("")(x) is x and DiffAugment([])(x) is x
    with pytest.raises(UserError, match="'colour' is not known; give a comma-separated subset of color, translation"):
        DiffAugment("colour,cutout")


# --- Spectral norm and R1 ---------------------------------------------------------------------------------------


def test_spectral_norm_bounds_the_largest_singular_value_of_every_weight():
    torch.manual_seed(0)
    disc = Discriminator(channels=3, image_size=16, num_classes=3, base_channels=8, extra_layers=1, spectral_norm=True)
    layers = [m for m in disc.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(layers) == 5 and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    for _ in range(30):  # one power iteration per forward pass in training mode
        disc(torch.randn(2, 3, 16, 16), torch.tensor([0, 2]))
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.01), m
    plain = Discriminator(channels=3, image_size=16, num_classes=3, base_channels=8, extra_layers=1)
    assert all(torch.linalg.matrix_norm(m.weight.flatten(1), ord=2) < 0.9 for m in plain.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))  # DCGAN's N(0, 0.02) weights, far from 1
