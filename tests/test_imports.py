"""Importing one model's training path must not import another model's heavy libraries.

The baseline is `import pytorch_lightning`: with transformers installed (peft needs it), Lightning's
torchmetrics already imports transformers' auto classes, which no code of ours can prevent. The
diffusers path (model=diffusers) is not listed: diffusers' UNet2DModel itself imports peft.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PATHS = {
    "ddpm": ("fiberaug.tasks.train", "fiberaug.models.diffusion", "fiberaug.nets.context_unet"),
    "gan": ("fiberaug.tasks.train", "fiberaug.models.gan", "fiberaug.nets.dcgan"),
}
FORBIDDEN = {
    "ddpm": ("transformers", "peft"),
    "gan": ("diffusers", "transformers", "peft"),
}


@pytest.mark.parametrize("model", sorted(PATHS))
def test_training_path_imports_only_its_own_libraries(model):
    code = "\n".join(
        [
            "import sys, pytorch_lightning",
            "before = set(sys.modules)",
            *(f"import {module}" for module in PATHS[model]),
            "added = {m.split('.')[0] for m in set(sys.modules) - before}",
            f"print(','.join(sorted(added & set({FORBIDDEN[model]!r}))))",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"model={model}'s training path imported {result.stdout.strip()}"


def test_augment_path_does_not_import_lightning():
    """augment.py only reads, transforms and writes images: it starts without Lightning's import time."""
    code = "import sys, fiberaug.tasks.augment; print('pytorch_lightning' in sys.modules or 'lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
