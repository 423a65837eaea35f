"""Atomic writers and file digests: every output is built in a temp file beside its target, then
renamed onto it, so a reader (or a crash) never sees half a file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl


@contextmanager
def atomic_path(path: str | Path, *, mode: int = 0o644, suffix: str = ".tmp") -> Iterator[str]:
    """A temp file beside ``path`` to write into; renamed onto ``path`` when the block ends
    normally, removed when it raises (so a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(
    path: str | Path, write: Callable[[str], None], *, mode: int = 0o644, suffix: str = ".tmp"
) -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` (removed again on failure)."""
    with atomic_path(path, mode=mode, suffix=suffix) as tmp:
        write(tmp)
    return Path(path)


def json_ready(value: Any) -> Any:
    """``value`` with NaN and infinities as None: bare NaN is not JSON (an empty case-study
    group has no metric), and strict readers (jq, JavaScript, other languages) reject it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def write_json(path: str | Path, payload: Any) -> Path:
    """Valid JSON (NaN written as null), mode 0644, atomically."""

    def write(tmp: str) -> None:
        text = json.dumps(json_ready(payload), indent=2, sort_keys=True, allow_nan=False)
        Path(tmp).write_text(text + "\n")

    return write_atomic(path, write)


def write_text(path: str | Path, text: str, *, mode: int = 0o644) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text), mode=mode)


def write_parquet(path: str | Path, frame: pl.DataFrame) -> Path:
    return write_atomic(path, frame.write_parquet)


def copy_file(source: str | Path, target: str | Path) -> Path:
    """Copy ``source`` onto ``target`` atomically."""
    return write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """The SHA-256 of a file as hex, read in chunks (the file may exceed memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
