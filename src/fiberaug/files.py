"""Files written so that no crash, not even `kill -9`, leaves a partial one behind under the real name."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fiberaug.errors import UserError

TEMP_SUFFIX = ".fiberaug-tmp"


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to a hidden temporary name beside `path`, flush it to disk, then rename it over `path`.

    A file that already holds exactly `data` is left untouched. The temporary name is the process's and
    thread's own, so two writers of one path never write into the same temporary file. `durable=False` skips
    the flush to disk (one `fsync` per file, slow on network file systems), for files whose damage by a power
    loss is detected and repaired anyway, such as checksummed cache entries; the rename still keeps other
    processes from ever seeing a partial file.
    """
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_temp_files(root: Path) -> int:
    """Delete the temporary files that interrupted writers left below `root`; returns how many there were."""
    stray = [p for p in root.rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stray:
        path.unlink()
    return len(stray)


@contextmanager
def locked_folder(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder `path` (released by the system even on `kill -9`).

    Refuses a second writer of the same folder, which would interleave its records with ours.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{path} is being written by another run; wait for it to finish") from None
        yield
    finally:
        os.close(fd)
