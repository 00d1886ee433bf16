"""User-facing errors: which exceptions end a command with one line naming the file or key."""

from __future__ import annotations


# Errors caused by the user's input (config, files, names); anything else is a bug and keeps
# its traceback.
USER_ERRORS = (FileNotFoundError, KeyError, ValueError, PermissionError, IsADirectoryError)


def one_line_error(e: BaseException) -> str:
    """The message of ``e`` on one line (KeyError's repr quotes are removed)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = str(msg).strip().replace("\n", " ")
    if isinstance(e, (FileNotFoundError, PermissionError)) and e.filename and e.filename not in msg:
        msg = f"{msg}: {e.filename}"
    return f"{type(e).__name__}: {msg}"
