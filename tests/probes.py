"""Callbacks that tests add to runs of the real scripts (`+callbacks.NAME._target_=probes.X`, with tests/ on
PYTHONPATH): they record what each DDP rank did, or stop a run the way a crash would."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from PIL import Image
from pytorch_lightning.callbacks import WeightAveraging

from fiberaug.models.base import GenerativeModule


class RankProbe(pl.Callback):
    """Saves, per rank, to `dirpath/rank<r>.pt`: the raw and averaged weights, the buffers, each optimizer's step
    counts, the torch random state at the first batch, the last training loss, the logged values, and how often it
    sampled."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.record: dict[str, Any] = {"samples": 0}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        sample, record = GenerativeModule.sample, self.record

        def counted(module: GenerativeModule, *args: Any, **kwargs: Any) -> torch.Tensor:
            record["samples"] += 1
            return sample(module, *args, **kwargs)

        GenerativeModule.sample = counted

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.record.setdefault("rng", torch.get_rng_state())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        if outputs:  # a manually optimised model (the GAN) returns nothing
            self.record["loss"] = float(outputs["loss"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        average = next((c._average_model.module for c in trainer.callbacks
                        if isinstance(c, WeightAveraging) and c._average_model is not None), None)
        self.record |= {
            "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "buffers": {k: v.detach().clone() for k, v in pl_module.named_buffers()},
            "average": {k: v.detach().clone() for k, v in average.named_parameters()} if average else None,
            "optimizer_steps": [int(o.state[o.param_groups[0]["params"][0]]["step"]) for o in trainer.optimizers],
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.dirpath / f"rank{trainer.global_rank}.pt")


class KillOnce(pl.Callback):
    """Kills its process with SIGKILL, as a crash or a lost node would, after training step `step` of sweep job
    `job`, the first time only (`marker` remembers it), so that the same command run again goes on."""

    def __init__(self, marker: str, job: int, step: int) -> None:
        self.marker, self.job, self.step = Path(marker), job, step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        if trainer.global_step == self.step and HydraConfig.get().job.num == self.job and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class TamperWithData(pl.Callback):
    """As a user tidying a data set during a long run: after training step `step`, removes the first training image
    and rewrites the second with other content; `note` (JSON) records both files and the second's new bytes' hash."""

    def __init__(self, note: str, step: int) -> None:
        self.note, self.step = Path(note), step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        if trainer.global_step != self.step:
            return
        removed, replaced = trainer.datamodule.train_set.items[:2]
        removed.unlink()
        replaced.write_bytes(_other_png(replaced))
        self.note.write_text(json.dumps({"removed": str(removed), "replaced": str(replaced),
                                         "new": hashlib.sha256(replaced.read_bytes()).hexdigest()}))


def _other_png(path: Path) -> bytes:
    """A PNG of another content than `path`'s, of the same size and mode."""
    with Image.open(path) as im:
        array = 255 - np.asarray(im.convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class DiscriminatorProbe(pl.Callback):
    """Saves to `dirpath/discriminator.pt`, after every training batch: the autoencoder steps and optimizer steps so
    far, how often the discriminator ran in that batch, and whether its weights or BatchNorm statistics differ from
    those it started training with (an `AutoencoderModule`'s)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.batches: list[dict[str, Any]] = []
        self.calls = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.discriminator.state_dict().items()}
        pl_module.discriminator.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + 1))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        state = pl_module.discriminator.state_dict()
        self.batches.append({
            "autoencoder_steps": pl_module.autoencoder_steps,
            "global_step": trainer.global_step,
            "calls": self.calls,
            "changed": sorted(k for k, v in self.initial.items() if not torch.equal(v, state[k])),
        })
        self.calls = 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(self.batches, self.dirpath / "discriminator.pt")


class LatentProbe(pl.Callback):
    """Saves to `dirpath/latent.pt` what a latent diffusion run did with its autoencoder: the shapes the denoiser
    took and gave, whether the autoencoder was ever in training mode or trainable, how many tensors the optimizer
    held, and the autoencoder's weights once fitting ended (after the EMA swapped its average in)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.record: dict[str, Any] = {"autoencoder_training": False}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def shapes(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.record.setdefault("net_in", tuple(args[0].shape))
            self.record.setdefault("net_out", tuple(output.shape))

        pl_module.net.register_forward_hook(shapes)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.record["autoencoder_training"] |= pl_module.autoencoder.training
        self.record["optimized"] = sum(len(g["params"]) for g in trainer.optimizers[0].param_groups)
        self.record["trainable"] = sum(p.requires_grad for p in pl_module.parameters())
        self.record["autoencoder_trainable"] = any(p.requires_grad for p in pl_module.autoencoder.parameters())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["autoencoder"] = {k: v.clone() for k, v in pl_module.autoencoder.state_dict().items()}
        torch.save(self.record, self.dirpath / "latent.pt")
