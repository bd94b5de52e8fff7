"""The throughput options: a sync-free EMA, no host-device sync on steps that do not log, channels_last,
torch.compile, TF32 matmuls, and no final sample grid for a run shorter than an epoch."""

from __future__ import annotations

import collections
import traceback
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY, compose_config
from test_gan import GAN_TINY
from torch import nn
from torch.optim.swa_utils import AveragedModel

import fiberaug.tasks.train as train_task
from fiberaug.callbacks import EMA
from fiberaug.tasks import run_task
from fiberaug.tasks.train import set_matmul_precision, train


def test_ema_lerps_trainable_weights_keeps_frozen_ones_and_copies_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    net[2].requires_grad_(False)
    ema = EMA(decay=0.75)
    ema._average_model = AveragedModel(net)
    before = [p.detach().clone() for p in ema._average_model.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.on_train_batch_end(SimpleNamespace(global_step=1), net, None, None, 0)
    for old, new, average in zip(before, net.parameters(), ema._average_model.module.parameters(), strict=True):
        expected = old + 0.25 * (new.detach() - old) if new.requires_grad else old
        assert torch.allclose(average, expected), "not the EMA update"
    assert torch.equal(ema._average_model.module[1].running_mean, net[1].running_mean), "buffers not copied"
    ema.on_train_batch_end(SimpleNamespace(global_step=1), net, None, None, 1)  # no optimizer step since
    assert torch.allclose(next(ema._average_model.module.parameters()), before[0] + 0.25, atol=1e-6)


def test_the_ema_shares_frozen_weights_instead_of_copying_them():
    module = pl.LightningModule()
    module.net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    module.net[0].requires_grad_(False)  # a LoRA's frozen base
    ema = EMA()
    ema.setup(None, module, "fit")
    average = ema._average_model.module.net
    assert average[0].weight is module.net[0].weight and average[0].bias is module.net[0].bias
    assert average[1].weight is not module.net[1].weight and torch.equal(average[1].weight, module.net[1].weight)
    assert "__deepcopy__" not in vars(module.net[0].weight)  # later copies copy it again


# What makes the CPU wait for a GPU: reading a tensor's value on the host.
READS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")
# Where such a read would come from on a GPU (the CPU-side step counters of torch's optimizers are not device reads).
WATCHED = ("fiberaug", "logger_connector", "progress", "swa_utils", "weight_averaging")


def test_steps_that_do_not_log_read_nothing_back_from_the_device(tmp_path, monkeypatch):
    state: dict[str, int | None] = {"step": None}
    reads: dict[int, list[str]] = collections.defaultdict(list)

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
            state["step"] = trainer.global_step

        def on_validation_start(self, *args) -> None:
            state["step"] = None  # validation, sampling and metrics read, and may

        on_train_epoch_end = on_validation_start

    for name in READS:
        original = getattr(torch.Tensor, name)

        def reading(self, *args, _original=original, **kwargs):
            if state["step"] is not None:
                # The code that asked: the innermost frame past Lightning's tensor-to-number helpers.
                stack = reversed(traceback.extract_stack()[:-1])
                frames = [f.filename for f in stack if "apply_func" not in f.filename]
                if any(w in frames[0] for w in WATCHED) and "test_throughput" not in frames[0]:
                    reads[state["step"]].append(frames[0])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, reading)
    instantiate = train_task.instantiate
    monkeypatch.setattr(train_task, "instantiate", lambda cfg, *a, **k: instantiate(
        cfg, *a, **({**k, "callbacks": [Probe(), *k["callbacks"]]} if "callbacks" in k else k)))
    train(compose_config("train", [*TINY, "trainer.max_steps=8", "trainer.log_every_n_steps=4"], tmp_path))
    quiet = {step: where for step, where in reads.items() if (step + 1) % 4}  # steps 3 and 7 log
    assert reads.keys() & {3, 7}, "the logging steps read nothing either: the probe is not counting"
    assert not quiet, f"host reads on steps that do not log: {dict(quiet)}"


def test_channels_last_reaches_the_weights_and_the_batches(tmp_path, monkeypatch):
    from fiberaug.models.diffusion import DiffusionModule

    formats = []
    step = DiffusionModule.training_step

    def recording(self, batch, batch_idx):
        convs = (m for m in self.net.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
        conv = next(m for m in convs if m.kernel_size[0] > 1)  # a layout that NCHW and NHWC do not share
        formats.append((batch[0].is_contiguous(memory_format=torch.channels_last),
                        conv.weight.is_contiguous(memory_format=torch.channels_last)))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", recording)
    train(compose_config("train", [*TINY, "model.channels_last=true", "trainer.max_steps=2"], tmp_path))
    assert formats == [(True, True)] * 2


def test_compile_compiles_every_network_once_on_its_device(tmp_path, monkeypatch):
    """The wiring: torch.compile itself takes a minute or two on a CPU (`benchmarks/throughput.py --compile`)."""
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    train(compose_config("train", [*GAN_TINY, "loss=hinge", "model.compile=true", "trainer.max_steps=2"], tmp_path))
    assert compiled == ["Generator", "Discriminator"]


def test_compile_is_refused_with_a_penalty_it_cannot_differentiate(tmp_path):
    cfg = compose_config("train", ["model=gan", "loss=wasserstein", "model.compile=true"], tmp_path)
    with pytest.raises(SystemExit, match="model.compile=true cannot be used with loss=wasserstein"):
        run_task(train, cfg)


def test_matmul_precision_is_set_for_the_run_and_checked():
    previous = torch.get_float32_matmul_precision()
    try:
        set_matmul_precision("medium")
        assert torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(Exception, match="matmul_precision='tf32' is not known"):
            set_matmul_precision("tf32")
    finally:
        torch.set_float32_matmul_precision(previous)


def test_a_run_shorter_than_an_epoch_draws_no_final_grid(tmp_path):
    train(compose_config("train", [*TINY, "trainer.max_steps=2"], tmp_path))
    assert not (tmp_path / "samples").exists() or not list((tmp_path / "samples").glob("*.png"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
