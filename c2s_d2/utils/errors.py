"""User-facing errors: which exceptions end a command with one line naming the file or key."""

from __future__ import annotations

import os
import traceback

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Messages of detectron2 / yacs errors caused by the user's input.
_KNOWN_PREFIXES = (
    "Non-existent config key",
    "Non-existent key",
    "Dataset '",
    "Invalid type",
    "Type mismatch",
)


def is_user_error(e: BaseException, scripts: tuple = ()) -> bool:
    """True for errors caused by input (files, config keys, values) rather than by a bug.

    File-system errors always are; ``ValueError`` / ``KeyError`` are when c2s-d2 raised them on
    purpose (innermost frame in the package or in one of ``scripts``) or when they are detectron2's config and catalog
    messages. Anything else keeps its traceback.
    """
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    if not isinstance(e, (ValueError, KeyError, AssertionError)):
        return False
    msg = str(e.args[0]) if e.args else ""
    if msg.startswith(_KNOWN_PREFIXES):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return False
    where = os.path.abspath(frames[-1].filename)
    return where.startswith(_PACKAGE_DIR) or where in {os.path.abspath(s) for s in scripts}


def one_line_error(e: BaseException) -> str:
    """The message of ``e`` on one line (KeyError's repr quotes are removed)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split())
    filename = getattr(e, "filename", None)
    if filename and str(filename) not in msg:
        msg = f"{msg}: {filename}"
    return f"{type(e).__name__}: {msg}"
