"""Downstream utility: the held-out accuracy of a small classifier trained on a given set of images.

The utility task trains it on a few real images per class, with and without classical augmentation and
generated images, and compares; this module is the measuring part: one seeded training and its accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fiberaug.nets.classifier import SmallClassifier

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def downstream_accuracy(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    augment: Augment | None = None,
) -> float:
    """Train `SmallClassifier` from seed `seed` for `steps` Adam steps on batches drawn uniformly from the
    training images (each batch passed through `augment` when given) and return its accuracy on the test set.

    Everything random (initialisation, batches, augmentation) comes from `seed`, so the conditions that a
    comparison varies are the only difference between two calls with the same seed.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallClassifier(train_images.shape[1], num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train_images), (min(batch_size, len(train_images)),), generator=generator)
        images = train_images[idx]
        if augment is not None:
            images = augment(images, generator)
        loss = F.cross_entropy(model(images), train_labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(batch).argmax(1) for batch in test_images.split(256)])
    return (predicted == test_labels).float().mean().item()
