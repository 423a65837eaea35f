"""Scratch folders beside the cache that no killed process leaves behind for long.

An import stages its intermediate files (about twice the input) in a hidden folder next to the
cache, and a cache is written into another one before it is renamed into place. Each is named
``.<cache>.<kind>-<host>-<pid>-<random>``: SIGTERM during the work removes the folder (the
signal is turned into SystemExit so that the cleanup runs), and after a SIGKILL the next import
into the same data folder removes every scratch folder whose process is gone. Folders of other
hosts (a shared file system) are left to their own host; old-style names without a pid
(written before this scheme) are removed once they are a day old.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

_SCRATCH = re.compile(r"\..+\.(?:import|tmp)-(?:(?P<host>[^-]+)-(?P<pid>\d+)-)?[^-]+")
_OLD_STYLE_AGE_S = 24 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def stale_scratch(parent: Path) -> list[Path]:
    """Scratch folders in ``parent`` whose process no longer runs."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    stale = []
    for path in parent.iterdir():
        match = _SCRATCH.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        if match["pid"] is None:
            if time.time() - path.stat().st_mtime > _OLD_STYLE_AGE_S:
                stale.append(path)
        elif match["host"] == _host() and not _alive(int(match["pid"])):
            stale.append(path)
    return stale


def remove_stale_scratch(parent: Path) -> None:
    for path in stale_scratch(parent):
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143) so that ``finally`` clauses run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def scratch_dir(parent: Path, name: str, kind: str) -> Iterator[Path]:
    """A fresh folder ``.<name>.<kind>-<host>-<pid>-*`` in ``parent``, removed when the block
    ends (normally, by an error or by SIGTERM) unless the block renamed it away; stale scratch
    folders of dead processes are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(parent)
    with sigterm_exits():
        prefix = f".{name}.{kind}-{_host()}-{os.getpid()}-"
        work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
