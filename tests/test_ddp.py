"""Training under DDP (trainer=ddp_cpu: two processes with gloo) through the real script, since Lightning starts
the second process by running the command again. tests/probes.py's RankProbe records what each rank did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROBES, TINY, run_script, tiny_autoencoder
from diffusers import AutoencoderKL
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_gan import GAN_TINY
from test_train import hparams_session

from fiberaug.imaging import labelled_grid, to_uint8
from fiberaug.models import load_generator


def _ddp_run(tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    probe = ["+callbacks.probe._target_=probes.RankProbe", f"+callbacks.probe.dirpath={tmp_path / 'probe'}"]
    result = run_script("train.py", *overrides, "trainer=ddp_cpu", *probe, f"hydra.run.dir={tmp_path}", env=PROBES)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    return rank0, rank1


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_rank_zero_writes_and_scale(run_dir: Path, rank0: dict, rank1: dict, batch_size: int) -> None:
    """Only rank 0 sampled, one TensorBoard file holds the run, and the hyperparameters show both ranks' batch."""
    assert rank0["samples"] >= 1 and rank1["samples"] == 0
    (events_file,) = (run_dir / "tensorboard").glob("events.*")
    events = EventAccumulator(str(events_file), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("samples")) == rank0["samples"]
    params, _, _ = hparams_session(run_dir)
    assert params["world_size"] == 2 and params["effective_batch_size"] == 2 * batch_size
    # Each rank draws its own noise: the same stream would give the images of both shards the same noise.
    assert not torch.equal(rank0["rng"], rank1["rng"])


def test_the_gan_trains_under_ddp_with_both_networks_stepping_alike_on_both_ranks(tmp_path):
    # WGAN-GP: the penalty's double backward, and two critic steps per generator step.
    rank0, rank1 = _ddp_run(tmp_path, *GAN_TINY, "loss=wasserstein", "loss.n_critic=2", "trainer.max_steps=7",
                            "~callbacks.metrics")  # so that only the grid samples
    # One epoch of 5 batches (a grid is drawn only once an epoch completes): 5 critic and 2 generator steps.
    assert rank0["optimizer_steps"] == rank1["optimizer_steps"] == [2, 5]  # generator, critic
    assert _same(rank0["params"], rank1["params"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert _same({k: ckpt["state_dict"][k] for k in rank0["params"]}, rank0["params"])
    # Logged values are the ranks' mean: the same on both, though each critic saw other images.
    for name in ("loss/critic", "loss/generator", "train/gradient_penalty"):
        assert rank0["logged"][name] == rank1["logged"][name]
    _check_rank_zero_writes_and_scale(tmp_path, rank0, rank1, batch_size=16)


def test_a_diffusion_model_trains_under_ddp_with_the_same_weights_ema_and_samples_on_both_ranks(tmp_path):
    rank0, rank1 = _ddp_run(tmp_path, *TINY, "trainer.max_steps=5", "~callbacks.metrics")  # one epoch, grids only
    assert rank0["optimizer_steps"] == rank1["optimizer_steps"] == [5]
    assert _same(rank0["params"], rank1["params"]) and _same(rank0["average"], rank1["average"])
    raw = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["current_model_state"]
    assert not _same({k: raw[k] for k in rank0["average"]}, rank0["average"])  # the average is not the raw weights
    # loss/train is synced: the mean of the two ranks' losses on their own shards.
    assert rank0["loss"] != rank1["loss"]
    assert rank0["logged"]["loss/train"] == rank1["logged"]["loss/train"]
    assert rank0["logged"]["loss/train"] == pytest.approx((rank0["loss"] + rank1["loss"]) / 2)
    _check_rank_zero_writes_and_scale(tmp_path, rank0, rank1, batch_size=16)
    # The checkpoint holds the EMA weights, and the last grid is what one process samples from them.
    model = load_generator(tmp_path / "checkpoints" / "last.ckpt")
    assert _same(dict(model.named_parameters()), rank0["average"])
    grid = labelled_grid(to_uint8(model.sample(4, seed=0, batch_size=4, steps=5)), model.label_names())  # debug=fast's
    written = np.asarray(Image.open(tmp_path / "samples" / "epoch0000-step0000005.png"))
    assert written.shape == grid.shape[:2] and np.abs(written.astype(int) - grid[..., 0].astype(int)).max() <= 1


def test_a_latent_model_trains_under_ddp_with_one_latent_scale_and_a_frozen_autoencoder(tmp_path):
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder")  # no scaling_factor: estimated when fitting starts
    rank0, rank1 = _ddp_run(tmp_path / "run", *TINY, "trainer.max_steps=3", "~callbacks.metrics",
                            f"model.autoencoder={autoencoder}")
    assert rank0["optimizer_steps"] == rank1["optimizer_steps"] == [3]
    assert _same(rank0["params"], rank1["params"]) and _same(rank0["buffers"], rank1["buffers"])
    assert 0 < rank0["buffers"]["latent_scale"].item() < float("inf")
    frozen = AutoencoderKL.from_pretrained(autoencoder).state_dict()
    assert all(torch.equal(rank0["params"][f"autoencoder.{k}"], v) for k, v in frozen.items() if f"autoencoder.{k}"
               in rank0["params"])
    assert all(torch.equal(rank0["average"][f"autoencoder.{k}"], v) for k, v in frozen.items()
               if f"autoencoder.{k}" in rank0["average"])
