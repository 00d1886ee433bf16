"""User-facing errors: which exceptions end a command with one line naming the file or key.

Errors raised in another process reach the command as text. A DataLoader worker's exception is
re-raised in the main process with the worker's traceback in its message ("Caught ValueError in
DataLoader worker process 0. Original Traceback ..."), and a process started by detectron2's
``launch`` fails the parent with ``ProcessRaisedException`` holding the child's traceback. Such
errors are judged, and shortened, by the innermost exception of the traceback they carry.
"""

from __future__ import annotations

import errno
import os
import re
import traceback
from typing import NamedTuple, Optional

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Messages of detectron2 / yacs errors caused by the user's input.
_KNOWN_PREFIXES = (
    "Non-existent config key",
    "Non-existent key",
    "Dataset '",
    "Invalid type",
    "Type mismatch",
)


class NonFiniteError(FloatingPointError):
    """A loss term or the weights became NaN/inf in training; the message says which and when."""


class OutputDirInUseError(RuntimeError):
    """Another run holds the lock of the output folder; the message names the folder and PID."""


class DiskFullError(OSError):
    """No space was left to write a file; the message names it and what is still intact."""


_ALWAYS_USER = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    NonFiniteError,
    OutputDirInUseError,
    DiskFullError,
)
# OSError numbers that say the disk, not the program, is at fault
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_USER_IF_OURS = (ValueError, KeyError, AssertionError)
# By name, for errors that come back from other processes as text (subclasses included).
_ALWAYS_USER_NAMES = {c.__name__ for c in _ALWAYS_USER} | {"DatasetNotPreparedError"}
_USER_IF_OURS_NAMES = {c.__name__ for c in _USER_IF_OURS}
_DISK_FULL_PREFIXES = tuple(f"[Errno {n}]" for n in _DISK_FULL)

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line \d+')
_TRACEBACK_HEADER = "Traceback (most recent call last):"


class RemoteError(NamedTuple):
    """The innermost exception of a traceback raised in another process."""

    type_name: str  # unqualified class name, e.g. "ValueError"
    message: str
    where: str  # file of the innermost frame


def remote_error(e: BaseException) -> Optional[RemoteError]:
    """The innermost exception carried by a DataLoader-worker or ``launch`` error (else None)."""
    text = getattr(e, "msg", None) if type(e).__name__ == "ProcessRaisedException" else None
    if text is None:
        text = str(e.args[0]) if e.args else ""
        if not (text.startswith("Caught ") and "Original " + _TRACEBACK_HEADER in text):
            return None
    lines = text.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if _FRAME.match(line)]
    if _TRACEBACK_HEADER not in text or not frames:
        return None
    # After the innermost "File ..." line: its source line(s), indented, then the exception.
    rest = [x for x in lines[frames[-1] + 1 :] if x.strip() and not x.startswith("    ")]
    head, _, message = " ".join(rest).partition(": ")
    type_name = head.strip().rsplit(".", 1)[-1]
    if type_name == "KeyError" and len(message) > 1 and message[0] == message[-1] in "'\"":
        message = message[1:-1]
    return RemoteError(type_name, message, _FRAME.match(lines[frames[-1]]).group("file"))


def _in_project(where: str, scripts: tuple) -> bool:
    where = os.path.abspath(where)
    return where.startswith(_PACKAGE_DIR) or where in {os.path.abspath(s) for s in scripts}


def is_user_error(e: BaseException, scripts: tuple = ()) -> bool:
    """True for errors caused by input (files, config keys, values) rather than by a bug.

    File-system errors (a full disk included) and the errors defined here always are;
    ``ValueError`` / ``KeyError`` / ``AssertionError`` are when c2s-d2 raised them on purpose
    (innermost frame in the package or in one of ``scripts``) or when they are detectron2's config
    and catalog messages. Errors of worker processes are judged by the exception they carry.
    Anything else keeps its traceback.
    """
    remote = remote_error(e)
    if remote is not None:
        if remote.type_name in _ALWAYS_USER_NAMES:
            return True
        if remote.type_name == "OSError" and remote.message.startswith(_DISK_FULL_PREFIXES):
            return True
        if remote.type_name not in _USER_IF_OURS_NAMES:
            return False
        return remote.message.startswith(_KNOWN_PREFIXES) or _in_project(remote.where, scripts)
    if isinstance(e, _ALWAYS_USER):
        return True
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    if not isinstance(e, _USER_IF_OURS):
        return False
    msg = str(e.args[0]) if e.args else ""
    if msg.startswith(_KNOWN_PREFIXES):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and _in_project(frames[-1].filename, scripts)


def one_line_error(e: BaseException) -> str:
    """The message of ``e`` on one line (KeyError's repr quotes are removed); for an error of a
    worker process, the message of the exception it carries."""
    remote = remote_error(e)
    if remote is not None:
        return f"{remote.type_name}: {' '.join(remote.message.split())}"
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split())
    filename = getattr(e, "filename", None)
    if filename and str(filename) not in msg:
        msg = f"{msg}: {filename}"
    return f"{type(e).__name__}: {msg}"
