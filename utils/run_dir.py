"""The output folder of a run: checked before any work starts, created only once the run is built."""
from __future__ import annotations

import os

from utils.errors import UserError


def check_output_dir(path: str, flag: str = "--output_dir") -> None:
    """UserError unless `path` exists as a writable directory or could be created; writes nothing."""
    if not path:
        return
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"output dir {path} exists and is not a directory; choose another {flag}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"output dir {path} is not writable; choose another {flag}")
        return
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot create output dir {path}: {parent} is not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create output dir {path}: {parent} is not writable; choose another {flag}")


def make_output_dir(path: str, flag: str = "--output_dir") -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"cannot write to output dir {path}: {err.strerror}; choose another {flag}") from None
