"""Open DiffuRec-format pickles without running code chosen by whoever made the file.

A pickle is a small program. Before unpickling we walk its opcodes and admit only the ones that
build plain containers and scalars (dicts, lists, ints, strings); anything that could import a
name or call one (GLOBAL, REDUCE, BUILD, ...) or build another type (floats, tuples, sets, bytes)
is refused. The unpickler we then run also refuses every global, as a second lock.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

from diffurec_lightning.errors import DataError

_ALLOWED_OPCODES = frozenset(
    {
        # framing and memo bookkeeping
        "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK",
        "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
        # ints
        "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
        # strings
        "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
        "SHORT_BINUNICODE", "BINUNICODE8",
        # lists and dicts
        "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
        "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    }
)  # fmt: skip


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def safe_load(path: str | Path) -> Any:
    """Unpickle a file that may only contain dicts, lists, ints and strings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path or the data mirror folder")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{path}: the file is empty; download it again")
    if raw[:1] != pickle.PROTO:
        # Every pickle written with protocol 2 or newer starts with PROTO; text or HTML (a
        # failed download page, say) does not.
        raise DataError(
            f"{path}: not a valid pickle file (no pickle protocol header); the file is of "
            "another format: download it again or check the path"
        )
    try:
        for opcode, _arg, pos in pickletools.genops(io.BytesIO(raw)):
            if opcode.name not in _ALLOWED_OPCODES:
                raise DataError(
                    f"{path}: refused to unpickle: opcode {opcode.name} at byte {pos} would build "
                    "an object other than dicts/lists/ints/strings; only plain data is accepted"
                )
    except DataError:
        raise
    except Exception as exc:  # pickletools raises ValueError / struct.error / EOF-ish errors
        raise DataError(
            f"{path}: not a valid pickle file ({exc}); the file is truncated or of another "
            "format: download it again or check the path"
        ) from None
    try:
        return _NoGlobalsUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:
        raise DataError(f"{path}: could not unpickle ({exc}); download the file again") from None
