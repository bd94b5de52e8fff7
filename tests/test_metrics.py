"""fiberaug.metrics: each measure moves the right way on images and point clouds whose answer is known."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import subprocess
import sys

import numpy as np
import prdc
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fiberaug.errors import UserError
from fiberaug.imaging import to_uint8
from fiberaug.metrics import (
    CHEAP,
    COPY_RATIO,
    SKIPPED_NOTE,
    class_consistency,
    embed,
    evaluate_images,
    fid_kid,
    fit_reader,
    match_sets,
    memorisation,
    monitor_mode,
    nearest_sheet,
    prdc_from_features,
    precision_recall_density_coverage,
    sliced_wasserstein,
)
from fiberaug.metrics.swd import _upsample, laplacian_pyramid

memorisation_module = importlib.import_module("fiberaug.metrics.memorisation")  # the package's name is the function

N_TRAIN = 1000  # the first 1,000 shuffled digits play the training set, the other 797 held-out real images


@functools.cache
def digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits scaled to size×size in [-1, 1], as DigitsDataModule serves them, in a
    seeded random order (the file lists them by writer, so its halves would differ in handwriting)."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    images = torch.tensor(data.images[order] / 16 * 2 - 1, dtype=torch.float32)[:, None]
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp(-1, 1)
    return images, torch.tensor(data.target[order])


def noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(-1, 1)


def box_blur(images: torch.Tensor, width: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(images, (width // 2,) * 4, mode="replicate"), width, stride=1)


def shifted(images: torch.Tensor, pixels: float) -> torch.Tensor:
    """Moved right and down by `pixels` (a fraction of a pixel resamples bilinearly)."""
    h, w = images.shape[2:]
    theta = torch.tensor([[1.0, 0.0, 2 * pixels / w], [0.0, 1.0, 2 * pixels / h]]).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


# --- common format ---


def test_match_sets_scales_the_larger_set_down_and_gray_up_to_rgb():
    gray16 = torch.linspace(-1, 1, 16).expand(4, 1, 16, 16)
    stripes48 = torch.tensor([-1.0, 1.0]).repeat(24).expand(5, 3, 48, 48)  # one-pixel columns, RGB
    a, b, description = match_sets(gray16, stripes48)
    assert a.shape == (4, 3, 16, 16) and b.shape == (5, 3, 16, 16)
    assert description == "compared at 16×16, RGB"
    assert torch.equal(a[:, 0], gray16[:, 0]) and torch.equal(a[:, 2], gray16[:, 0])  # gray repeated, not rescaled
    assert b.abs().max() < 0.5  # antialiased: stripes finer than the new pixels average out instead of aliasing
    assert match_sets(gray16, gray16[:2])[2] == "compared at 16×16, grayscale"


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 16, 16), "expected a tensor N×C×H×W with C = 1 or 3"),
        (torch.zeros(2, 4, 16, 16), "expected a tensor N×C×H×W with C = 1 or 3"),
        (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), "expected floats in"),
        (torch.full((2, 1, 16, 16), 255.0), r"values span \[255, 255\]; expected images scaled to \[-1, 1\]"),
        (torch.zeros(0, 1, 16, 16), "the batch is empty"),
    ],
)
def test_bad_batches_get_a_one_line_user_error(images, message):
    with pytest.raises(UserError, match=f"fake: {message}"):
        match_sets(torch.zeros(2, 1, 16, 16), images)


# --- SWD ---


def test_laplacian_pyramid_bands_add_up_to_the_image():
    images = torch.rand(3, 3, 37, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # odd sizes too
    bands = laplacian_pyramid(images, 3)
    assert [band.shape[2:] for band in bands] == [(37, 64), (19, 32), (10, 16)]
    rebuilt = bands[-1]
    for band in reversed(bands[:-1]):
        rebuilt = band + _upsample(rebuilt, band.shape[2:])
    assert torch.allclose(rebuilt, images, atol=1e-5)
    ramp = torch.linspace(-1, 1, 64).expand(1, 1, 64, 64)  # no detail: the band-pass levels are empty inside
    assert laplacian_pyramid(ramp, 3)[0][..., 4:-4, 4:-4].abs().max() < 1e-5


def test_swd_levels_are_named_by_resolution_and_averaged():
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = sliced_wasserstein(images, images.flip(0), patches_per_image=16)
    assert list(scores) == ["swd", "swd/64", "swd/32", "swd/16"]
    assert scores["swd"] == pytest.approx(np.mean([scores["swd/64"], scores["swd/32"], scores["swd/16"]]))
    assert list(sliced_wasserstein(images[:, :1, :16, :16], images[:, :1, :16, :16])) == ["swd", "swd/16"]


def test_swd_is_deterministic_under_its_seed():
    real, fake = digits(16)[0][:200], digits(16)[0][200:400]
    first, again = sliced_wasserstein(real, fake, seed=3), sliced_wasserstein(real, fake, seed=3)
    assert first == again
    assert sliced_wasserstein(real, fake, seed=4) != first


def swd_sets() -> tuple[torch.Tensor, torch.Tensor]:
    """200 training and 200 held-out digits at 32×32: two levels, 32 and 16."""
    images = digits(32)[0]
    return images[:200], images[N_TRAIN : N_TRAIN + 200]


@pytest.mark.parametrize(
    "degrade",
    [
        pytest.param([functools.partial(noisy, sigma=s) for s in (0.05, 0.1, 0.2, 0.4)], id="noise"),
        pytest.param([functools.partial(box_blur, width=w) for w in (3, 5, 7, 9)], id="blur"),
    ],
)
def test_swd_is_near_zero_for_the_same_distribution_and_grows_with_degradation(degrade):
    real, held_out = swd_sets()
    same = sliced_wasserstein(real, held_out)["swd"]
    scores = [sliced_wasserstein(real, step(held_out))["swd"] for step in degrade]
    assert same < scores[0] / 1.5, f"same distribution {same:.1f} against the mildest degradation {scores[0]:.1f}"
    assert scores == sorted(scores) and len(set(scores)) == len(scores), f"not increasing: {scores}"


# --- precision, recall, density, coverage ---


def gaussian(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """2-D standard normal samples, moved along the first axis and scaled: overlaps known in closed form."""
    points = np.random.default_rng(seed).standard_normal((n, 2)) * scale
    points[:, 0] += shift
    return points


def test_prdc_agrees_with_the_authors_package():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((300, 8)), rng.standard_normal((200, 8)) * 1.3 + 0.2
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        at3, at5 = prdc.compute_prdc(real, fake, 3), prdc.compute_prdc(real, fake, 5)
    ours = prdc_from_features(real, fake)
    assert ours["precision"] == pytest.approx(at3["precision"]) and ours["recall"] == pytest.approx(at3["recall"])
    assert ours["density"] == pytest.approx(at5["density"]) and ours["coverage"] == pytest.approx(at5["coverage"])


def test_prdc_on_gaussians_of_known_overlap():
    real = gaussian(1000, seed=0)
    same = prdc_from_features(real, gaussian(1000, seed=1))
    assert same["precision"] > 0.9 and same["recall"] > 0.9 and same["coverage"] > 0.9
    assert 0.9 < same["density"] < 1.1
    disjoint = prdc_from_features(real, gaussian(1000, seed=1, shift=12))
    assert all(value == 0 for value in disjoint.values()), disjoint
    collapsed = prdc_from_features(real, gaussian(1000, seed=1, scale=0.2))  # a generator that draws the centre only
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.4 and collapsed["coverage"] < 0.4
    apart = [prdc_from_features(real, gaussian(1000, seed=1, shift=s)) for s in (0.0, 1.5, 3.0, 4.5)]
    for name in ("precision", "recall", "density", "coverage"):
        values = [result[name] for result in apart]
        assert values == sorted(values, reverse=True) and values[0] > values[-1] + 0.5, f"{name}: {values}"


def test_prdc_needs_more_images_than_neighbours():
    with pytest.raises(UserError, match="need more than 5 real and generated images, got 5 real and 100"):
        prdc_from_features(gaussian(5, seed=0), gaussian(100, seed=1))


def test_random_embedding_is_deterministic_unit_length_and_batch_independent():
    images = digits(16)[0][:50]
    features = embed(images)
    assert features.shape == (50, 1920) and features.dtype == np.float32
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    assert np.allclose(embed(images, batch_size=7), features, atol=1e-6)
    assert np.allclose(embed(images.expand(-1, 3, -1, -1)), features)  # gray is read as RGB


def test_prdc_on_digits_separates_real_from_blurred_collapsed_and_noisy_images():
    images, labels = digits(16)
    train, held_out, held_labels = images[:N_TRAIN], images[N_TRAIN:], labels[N_TRAIN:]
    real = precision_recall_density_coverage(train, held_out)
    assert min(real.values()) > 0.85, real
    # Blur must not look more real than real (in pixel space it does: an average is close to everything).
    blurred = precision_recall_density_coverage(train, box_blur(held_out, 3))
    assert blurred["density"] < real["density"] - 0.1 and blurred["precision"] < real["precision"], blurred
    train_features = embed(train)
    two_classes = embed(held_out[held_labels < 2])  # a generator that draws only 0s and 1s
    collapsed = prdc_from_features(train_features, two_classes)
    assert collapsed["precision"] > 0.85 and collapsed["recall"] < 0.3 and collapsed["coverage"] < 0.4, collapsed
    noise = prdc_from_features(train_features, embed(noisy(held_out, 0.3)))
    assert noise["precision"] < real["precision"] - 0.3 and noise["density"] < real["density"] / 2, noise


# --- FID and KID ---


class TinyInception(torch.nn.Module):
    """inception-2015-12-05.pt's calling convention: uint8 N×3×H×W in, N×F features with return_features."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        x = images.float() / 255
        features = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), F.adaptive_avg_pool2d(x, 2).flatten(1)], dim=1)
        return features * self.gain if return_features else features[:, :2]


@pytest.fixture
def inception_file(tmp_path):
    def write(gain: float = 1.0) -> str:
        path = tmp_path / f"tiny-inception-{gain}.pt"
        torch.jit.save(torch.jit.script(TinyInception(gain)), str(path))
        return str(path)

    return write


def test_fid_and_kid_are_computed_through_the_weights_file(inception_file):
    images = digits(16)[0]
    real, held_out = images[:400], images[1000:1400]
    same = fid_kid(real, real, inception_file())[0]
    assert abs(same["fid"]) < 1e-6
    halves, notes = fid_kid(real, held_out, inception_file())
    brighter = fid_kid(real, (held_out + 0.3).clamp(-1, 1), inception_file())[0]
    assert notes == [] and set(halves) == {"fid", "kid", "kid_std"}
    assert brighter["fid"] > 20 * halves["fid"]
    assert brighter["kid"] > 20 * abs(halves["kid"]) and brighter["kid"] > 10 * brighter["kid_std"]
    # Features twice as large, FID four times: the number comes from the network in the file.
    assert fid_kid(real, held_out, inception_file(gain=2.0))[0]["fid"] == pytest.approx(4 * halves["fid"])


def test_kid_is_seeded_and_leaves_the_global_generator_alone(inception_file):
    real, fake = digits(16)[0][:300], noisy(digits(16)[0][1000:1300], 0.2)
    state = torch.get_rng_state()
    first = fid_kid(real, fake, inception_file(), seed=1)[0]
    assert torch.equal(torch.get_rng_state(), state)
    assert fid_kid(real, fake, inception_file(), seed=1)[0] == first
    assert fid_kid(real, fake, inception_file(), seed=2)[0]["kid"] != first["kid"]


def test_fid_without_a_file_is_skipped_with_a_note():
    values, notes = fid_kid(torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 16, 16), None)
    assert values == {} and notes == [SKIPPED_NOTE]
    assert "inception=PATH" in SKIPPED_NOTE and "inception-2015-12-05.pt" in SKIPPED_NOTE


def test_a_missing_or_unreadable_weights_file_is_a_user_error(tmp_path):
    images = torch.zeros(4, 1, 16, 16)
    with pytest.raises(UserError, match=r"inception=.*nowhere\.pt is not a file; expected a TorchScript Inception"):
        fid_kid(images, images, tmp_path / "nowhere.pt")
    (tmp_path / "notes.pt").write_text("not a network")
    with pytest.raises(UserError, match=r"inception=.*notes\.pt is not a TorchScript file .*inception-2015-12-05"):
        fid_kid(images, images, tmp_path / "notes.pt")


# --- memorisation ---


def test_memorisation_flags_copies_and_light_perturbations_of_training_images():
    images = digits(16)[0]
    train, originals = images[:N_TRAIN], images[:200]
    for name, copies in {
        "exact": originals,
        "noise": noisy(originals, 0.03),
        "brighter": (originals + 0.03).clamp(-1, 1),
        "shifted a tenth of a pixel": shifted(originals, 0.1),
    }.items():
        result = memorisation(copies, train)
        assert result.copies.double().mean() > 0.95, f"{name}: {result.copies.double().mean():.0%} flagged"
        assert torch.equal(result.nearest[:, 0], torch.arange(200)), f"{name}: nearest is not the source"
    exact = memorisation(originals, train)
    assert torch.equal(exact.ratio, torch.zeros(200)) and torch.equal(exact.distances[:, 0], torch.zeros(200))


def test_memorisation_does_not_flag_held_out_real_images():
    images = digits(16)[0]
    result = memorisation(images[N_TRAIN:], images[:N_TRAIN])
    assert result.copies.double().mean() <= 0.01
    assert result.values()["memorisation"] == result.copies.double().mean().item()
    assert result.values()["memorisation/median_ratio"] > 0.5


def test_repeats_flag_the_near_identical_samples_of_a_collapsed_generator(monkeypatch):
    images = digits(16)[0]
    train, varied = images[:N_TRAIN], images[N_TRAIN : N_TRAIN + 100]
    assert memorisation(varied, train).values()["memorisation/repeats"] <= 0.02  # real digits hardly repeat
    # 50 of 100 samples are 5 noisy draws of each of 10 digits, the other 50 distinct digits: exactly those 50 repeat.
    collapsed = torch.cat([noisy(varied[:10].repeat(5, 1, 1, 1), 0.03), varied[10:60]])
    result = memorisation(collapsed, train)
    assert torch.equal(result.repeats, torch.arange(100) < 50)
    assert result.values()["memorisation/repeats"] == 0.5
    assert result.values()["memorisation"] == 0.0  # held-out digits: repeats are not copies
    monkeypatch.setattr(memorisation_module, "SCALE_IMAGES", 60)  # only the first 60 are compared: 50 repeat
    assert torch.equal(memorisation(collapsed, train).repeats, torch.arange(60) < 50)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image re-encoded as a JPEG of that quality and decoded."""
    from PIL import Image

    out = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer), dtype=np.float32).reshape(array.shape)
        out.append(torch.from_numpy(decoded).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def test_copies_are_found_where_the_training_set_holds_near_duplicates_of_its_own():
    """A fifth of the training digits twice (the second noised, as a photo shot twice): d2 is then as small as d1 for
    their copies, which the ratio alone misses; d1 against the set's own neighbour distances finds them. Shifted
    by a pixel, they are found through the shifts."""
    images = digits(16)[0]
    twinned = images[:60]
    train = torch.cat([images[:300], noisy(twinned, 0.05)])
    planted = {"exact": twinned, "JPEG 75": jpeg(twinned, 75), "shifted a pixel": torch.roll(twinned, 1, dims=3)}
    for name, copies in planted.items():
        result = memorisation(copies, train)
        assert result.copies.all(), f"{name}: {result.copies.double().mean():.0%} flagged"
    assert (memorisation(planted["JPEG 75"], train).ratio > COPY_RATIO).double().mean() > 0.9  # the ratio alone
    held_out = memorisation(images[N_TRAIN:], train)
    assert held_out.copies.double().mean() <= 0.01 and held_out.scale > 0


def test_memorisation_does_not_depend_on_the_chunk_size():
    images = digits(16)[0]
    fake = torch.cat([images[:30], noisy(images[N_TRAIN : N_TRAIN + 30], 0.1)])
    whole, chunked = memorisation(fake, images[:N_TRAIN]), memorisation(fake, images[:N_TRAIN], chunk=7)
    assert torch.equal(whole.nearest, chunked.nearest) and torch.allclose(whole.ratio, chunked.ratio)


def test_nearest_sheet_shows_the_closest_pairs_first_with_their_verdict():
    images = digits(16)[0]
    train = images[:N_TRAIN]
    fake = torch.cat([images[N_TRAIN : N_TRAIN + 20], images[5:8]])  # 20 new digits, then 3 copies
    result = memorisation(fake, train)
    sheet = nearest_sheet(fake, train, result, rows=4, cell=32)
    header, cell, pad = 14, 32, 2
    assert sheet.dtype == np.uint8 and sheet.shape == (header + 4 * (cell + pad) + pad, 3 * (cell + pad) + pad + 150, 3)
    first = to_uint8(torch.stack([fake[20], train[5]])).repeat(2, axis=1).repeat(2, axis=2)  # a copy, 16 → 32 px
    top = header + pad
    assert np.array_equal(sheet[top : top + cell, pad : pad + cell, 0], first[0, ..., 0])
    assert np.array_equal(sheet[top : top + cell, 2 * pad + cell : 2 * pad + 2 * cell, 0], first[1, ..., 0])

    def red_in_label(row: int) -> bool:
        y = header + pad + row * (cell + pad)
        label = sheet[y : y + cell, 3 * (cell + pad) + pad :].astype(int)
        return bool(((label[..., 0] > 200) & (label[..., 1] < 120)).any())

    assert [red_in_label(row) for row in range(4)] == [True, True, True, False]  # three copies, then a new digit


# --- class consistency ---


@pytest.fixture(scope="module")
def reader():
    images, labels = digits(16)
    return fit_reader(images[:N_TRAIN], labels[:N_TRAIN], seed=0)


def test_class_consistency_reads_held_out_digits_as_their_class(reader):
    images, labels = digits(16)
    names = [f"digit{i}" for i in range(10)]
    values = class_consistency(reader, images[N_TRAIN:], labels[N_TRAIN:], names)
    assert reader.accuracy > 0.9 and values["classifier_accuracy"] == reader.accuracy
    assert values["class_consistency"] > 0.9
    assert {name: values[f"class_consistency/{name}"] > 0.8 for name in names} == dict.fromkeys(names, True)


def test_class_consistency_is_low_for_images_drawn_for_another_class(reader):
    images, labels = digits(16)
    images, labels = images[N_TRAIN:], labels[N_TRAIN:]
    swapped = class_consistency(reader, images, (labels + 1) % 10)
    assert swapped["class_consistency"] < 0.1
    # A generator whose "5"s are all 3s: only class 5 reads low (classes named by index without names).
    kept = labels != 5
    threes_for_fives = class_consistency(reader, images[kept], torch.where(labels[kept] == 3, 5, labels[kept]))
    assert threes_for_fives["class_consistency/5"] < 0.1 and "class_consistency/3" not in threes_for_fives
    assert min(v for k, v in threes_for_fives.items() if k.startswith("class_consistency/") and k[-1] != "5") > 0.8


def test_classifier_accuracy_comes_from_real_images_it_did_not_see():
    images = digits(16)[0][:N_TRAIN]
    random_labels = torch.from_numpy(np.random.default_rng(0).integers(0, 10, N_TRAIN))
    assert fit_reader(images, random_labels).accuracy < 0.2  # chance is 0.1; on its own fit it scores far higher


def test_class_consistency_refuses_labels_that_do_not_fit(reader):
    images, labels = digits(16)
    with pytest.raises(UserError, match=r"fake_labels: expected one label per generated image \(5\)"):
        class_consistency(reader, images[:5], labels[:4])
    with pytest.raises(UserError, match="fake_labels: values must be class indices below 2"):
        class_consistency(reader, images[:5], labels[:5] * 0 + 7, ["a", "b"])


# --- the entry point ---


def test_evaluate_images_runs_only_the_metrics_asked_for():
    images = digits(16)[0]
    result = evaluate_images(images[N_TRAIN : N_TRAIN + 200], images[:100], train=images[:N_TRAIN], metrics=CHEAP)
    assert set(result.values) == {"swd", "swd/16", "memorisation", "memorisation/median_ratio", "memorisation/repeats"}
    assert result.values["memorisation"] == 1.0  # the "generated" images are training images
    assert result.artefacts["nearest"].shape[2] == 3 and result.memorisation.nearest.shape == (100, 2)
    assert result.notes == ["compared at 16×16, grayscale"]


def test_evaluate_images_names_every_value_with_a_direction(inception_file):
    images, labels = digits(16)
    real, fake = images[N_TRAIN : N_TRAIN + 400], noisy(images[:200], 0.1)
    result = evaluate_images(
        real, fake, real_labels=labels[N_TRAIN : N_TRAIN + 400], fake_labels=labels[:200], inception=inception_file()
    )
    expected = {"swd", "swd/16", "precision", "recall", "density", "coverage", "fid", "kid", "kid_std", "memorisation",
                "memorisation/median_ratio", "memorisation/repeats", "class_consistency", "classifier_accuracy"}
    assert expected | {f"class_consistency/{c}" for c in range(10)} == set(result.values)
    assert "memorisation measured against the real images: no training set given" in result.notes
    assert result.values["memorisation"] < 0.05  # noisy training digits are no copies of the held-out ones
    modes = {name: monitor_mode(f"val/{name}") for name in result.values}
    lower = {name for name, mode in modes.items() if mode == "min"}
    assert lower == {"swd", "swd/16", "fid", "kid", "kid_std", "memorisation", "memorisation/repeats"}


def test_evaluate_images_notes_what_it_skipped_and_refuses_unknown_metrics():
    images = digits(16)[0]
    result = evaluate_images(images[:50], images[50:100], metrics=("fid", "class_consistency"))
    assert result.values == {}
    assert SKIPPED_NOTE in result.notes
    assert "class consistency skipped: it needs real_labels and fake_labels" in result.notes
    with pytest.raises(UserError, match="metrics: 'ssim' not known; choose from swd, prdc, fid, memorisation"):
        evaluate_images(images[:50], images[50:100], metrics=("swd", "ssim"))
    with pytest.raises(UserError, match="'val/psnr' is not a metric of fiberaug.metrics"):
        monitor_mode("val/psnr")


def test_importing_the_metrics_pulls_in_no_model_library_and_no_other_layer():
    code = (
        "import sys, fiberaug.metrics\n"
        "bad = {'diffusers', 'transformers', 'peft', 'pytorch_lightning', 'lightning', 'torchmetrics'}\n"
        "layers = {m for m in sys.modules if m.startswith('fiberaug.') and m.split('.')[1] not in "
        "('metrics', 'errors', 'imaging')}\n"
        "print(sorted(bad & {m.split('.')[0] for m in sys.modules} | layers))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
