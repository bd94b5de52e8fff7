"""What every FiberAug model shares: self-describing checkpoints that carry the random state an exact resume needs;
and what every generative one shares besides: class names and seeded batched sampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from tqdm.auto import tqdm

import fiberaug
from fiberaug.errors import UserError
from fiberaug.seeding import derive_seed, rng_states, set_rng_states

Label = int | str


class FiberAugModule(pl.LightningModule):
    """A LightningModule whose checkpoints name their class, FiberAug's version and the data that trained it, and
    carry the random streams, so that a resumed run continues exactly and a checkpoint rebuilds its own model."""

    #: The names this module logs, so that `train.py` can refuse an `optimized_metric` nothing will log.
    metric_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._resumed_rng: dict[str, Any] | None = None

    def fused(self) -> dict[str, bool]:
        """`fused=True` for torch's Adam/AdamW on CUDA: one kernel for the whole update instead of several per
        tensor (and no host-side step counters); elsewhere the default."""
        return {"fused": True} if self.device.type == "cuda" else {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint["fiberaug"] = {
            "module": f"{cls.__module__}.{cls.__qualname__}",
            "version": fiberaug.__version__,
            "rng": rng_states(),
        }
        datamodule = getattr(self._trainer, "datamodule", None)
        if hasattr(datamodule, "record"):  # which images trained it, for evaluation and the utility task
            checkpoint["fiberaug"]["data"] = datamodule.record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_rng = checkpoint.get("fiberaug", {}).get("rng")

    def on_train_start(self) -> None:
        """A resumed run continues the random streams where the checkpoint left them (timesteps, noise, dropout).

        Restored here, after the sanity check and the data loaders' start, neither of which draws from them.
        Under DDP every rank was seeded alike and would draw the same noise and timesteps for its different
        images; ranks other than 0 start a stream of their own from (seed, rank, step) instead. A checkpoint
        holds rank 0's streams, so rank 0 resumes exactly and the other ranks from that derived seed.
        """
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None
        if self.global_rank > 0:
            torch.manual_seed(derive_seed(torch.initial_seed(), self.global_rank, self.global_step))


class GenerativeModule(FiberAugModule):
    """A LightningModule that generates images; subclasses implement `generate` for one batch."""

    #: Keyword options of `generate` that `sample.py` may pass on (e.g. `steps` for diffusion).
    sampling_options: tuple[str, ...] = ()

    def __init__(self, class_names: Sequence[str] = (), channels_last: bool = False, compile: bool = False) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.channels_last = channels_last
        self.compile_networks = compile

    def networks(self) -> list[torch.nn.Module]:
        """The networks that `channels_last` and `compile` apply to."""
        return []

    def on_fit_start(self) -> None:
        """Throughput options, applied once the networks are on their device: `channels_last` stores weights and
        batches NHWC, which tensor-core convolutions read fastest; `compile` runs each network's forward through
        `torch.compile` (in place: checkpoints keep their keys), at the cost of compiling during the first steps."""
        for net in self.networks():
            if self.channels_last:
                net.to(memory_format=torch.channels_last)
            if self.compile_networks:
                net.compile()

    def memory_format(self, images: torch.Tensor) -> torch.Tensor:
        """A training batch in the networks' memory format (NHWC with `channels_last`)."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def generate(
        self, labels: torch.Tensor | None, generators: list[torch.Generator], progress: bool = False, **options: Any
    ) -> torch.Tensor:
        """One batch of images in [-1, 1], one per generator, conditioned on `labels` when given."""
        raise NotImplementedError

    def noise(self, shape: Sequence[int], generators: list[torch.Generator]) -> torch.Tensor:
        """Standard normal noise of `(len(generators), *shape)`, each row from its own generator."""
        rows = [torch.randn(tuple(shape), generator=g) for g in generators]
        return torch.stack(rows).to(self.device)

    def label_indices(self, labels: Sequence[Label] | Label | None, num_samples: int) -> torch.Tensor | None:
        """Class indices for `num_samples` images: `labels` (names or indices) repeated in turn.

        Without labels a class-conditional model cycles through all of its classes.
        """
        cycle = self._label_cycle(labels)
        if cycle is None:
            return None
        return torch.tensor([cycle[i % len(cycle)] for i in range(num_samples)], device=self.device)

    def label_names(self, labels: Sequence[Label] | Label | None = None) -> list[str]:
        """The class names samples are drawn for in turn (sample i: name i % len), [] without classes: a sample
        grid's column names."""
        return [self.class_names[i] for i in self._label_cycle(labels) or []]

    def _label_cycle(self, labels: Sequence[Label] | Label | None) -> list[int] | None:
        """The class indices `labels` name, which samples repeat in turn (all classes when None)."""
        if not self.num_classes:
            if labels is not None:
                raise UserError(f"labels={labels!r}: this model was trained without class labels; leave labels unset")
            return None
        if labels is None:
            labels = list(range(self.num_classes))
        elif isinstance(labels, (int, str)):
            labels = [labels]
        indices = [self._label_index(label) for label in labels]
        if not indices:
            raise UserError("labels=[] is empty; give class names or indices, or leave labels unset")
        return indices

    def _label_index(self, label: Label) -> int:
        if isinstance(label, str) and label in self.class_names:
            return self.class_names.index(label)
        if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
            if 0 <= int(label) < self.num_classes:
                return int(label)
        known = ", ".join(f"{i}={name}" for i, name in enumerate(self.class_names))
        raise UserError(f"labels: {label!r} is not a class of this model; it knows (index=name): {known}")

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        labels: Sequence[Label] | Label | None = None,
        seed: int = 0,
        batch_size: int = 64,
        progress: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """`num_samples` images in [-1, 1] on the CPU; the same seed gives the same images."""
        if num_samples < 1 or batch_size < 1:
            raise UserError(f"num_samples={num_samples} and batch_size={batch_size} must be at least 1")
        label_idx = self.label_indices(labels, num_samples)
        batches = []
        with tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress) as bar:
            for start in range(0, num_samples, batch_size):
                stop = min(start + batch_size, num_samples)
                batch_labels = label_idx[start:stop] if label_idx is not None else None
                batches.append(self.sample_draws(range(start, stop), batch_labels, seed, progress, **options))
                bar.update(stop - start)
        return torch.cat(batches)

    @torch.no_grad()
    def sample_draws(
        self, draws: Sequence[int], labels: torch.Tensor | None, seed: int = 0, progress: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """The images of the given draws of a seeded series, in [-1, 1] on the CPU, in eval mode: draw i's noise
        comes from (seed, i) alone, so it does not depend on batch size or order. `labels`: each draw's class index,
        or None."""
        was_training = self.training
        self.eval()
        generators = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in draws]
        images = self.generate(labels, generators, progress=progress, **options).float().cpu()
        self.train(was_training)
        return images
