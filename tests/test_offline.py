"""FiberAug makes no network call it was not asked to make, in the scripts and in their worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import HANG_GUARD, ROOT, TINY, save

# Loaded by every Python process started with this folder on PYTHONPATH (workers included): it records each
# attempt to resolve a host name or to open an internet socket, and refuses it.
GUARD = '''
import os, socket
LOG = os.environ["NETWORK_LOG"]
def _refuse(what):
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} {what}\\n")
    raise OSError(f"network call refused by the test: {what}")
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(f"connect {address}")
    return _connect(self, address)
socket.socket.connect = connect
socket.getaddrinfo = lambda host, *args, **kwargs: _refuse(f"getaddrinfo {host}")
'''


def _run(tmp_path: Path, script: str, *overrides: str) -> tuple[subprocess.CompletedProcess, str]:
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    env |= {"PYTHONPATH": os.pathsep.join([str(guard), env.get("PYTHONPATH", "")]), "NETWORK_LOG": str(log)}
    result = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=HANG_GUARD)
    return result, log.read_text() if log.exists() else ""


def test_the_guard_sees_albumentations_asking_for_updates(tmp_path):
    """The check itself: without FiberAug's setting, importing albumentations tries the network."""
    (tmp_path / "probe.py").write_text("import albumentations\n")
    result, calls = _run(tmp_path, str(tmp_path / "probe.py"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "getaddrinfo" in calls or "connect" in calls


def test_training_with_data_workers_makes_no_network_call(tmp_path, image_folder):
    data = ["data=folder", f"data.root={image_folder(broken=False)}", "data.num_workers=2", "augment=photometric"]
    result, calls = _run(tmp_path, "train.py", *TINY, *data, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert calls == "", f"network calls: {calls}"


def test_batch_augmentation_workers_make_no_network_call(tmp_path):
    for i in range(4):
        save(tmp_path / "in" / f"{i}.png", np.full((12, 12, 3), 40 * i, dtype=np.uint8))
    result, calls = _run(tmp_path, "augment.py", f"input_dir={tmp_path / 'in'}", f"output_dir={tmp_path / 'out'}",
                         "workers=2", "copies=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert calls == "", f"network calls: {calls}"
