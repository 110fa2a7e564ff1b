"""The output folder of a run: checked before any work starts, created only once the run is built,
and held by one run at a time (`OutputDirLock`)."""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys

from utils.errors import UserError

_logger = logging.getLogger("main")


def _existing_ancestor(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    return parent


def path_problem(path: str) -> str:
    """Why `path` is not a folder, as the end of a sentence: "does not exist", "is a file, not a
    folder", or "cannot exist: /a/b is a file, not a folder" (a file where a parent folder should be)."""
    if os.path.exists(path):
        return "is a file, not a folder" if os.path.isfile(path) else "is not a folder"
    ancestor = _existing_ancestor(path)
    if ancestor and not os.path.isdir(ancestor):
        return f"cannot exist: {ancestor} is a file, not a folder"
    return "does not exist"


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
    parent = _existing_ancestor(path)
    if not os.path.isdir(parent):
        raise UserError(f"cannot create output dir {path}: {parent} is a file, not a directory; choose another {flag}")
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


LOCK_NAME = ".lock"


def _describe_holder(holder: dict) -> str:
    text = f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
    command = str(holder.get("command") or "")
    return text + (f": {command[:120]}{' ...' if len(command) > 120 else ''}" if command else "")


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536).decode("utf-8", "replace").strip()
        holder = json.loads(data) if data else {}
    except (OSError, ValueError):
        return {"host": "?", "pid": "?", "started": "? (unreadable lock file)"}
    return holder if isinstance(holder, dict) else {}


class OutputDirLock:
    """One run per output folder: an OS-level lock (flock) on `output_dir/.lock`, taken by rank 0
    and held for the whole run.

    The operating system releases it when the process ends in any way (a crash or SIGKILL
    included), so a dead run never blocks a new one; the file names the holder (host, PID,
    start time, command line) so that a second run can say who is using the folder. A clean
    exit removes the file; a file left behind is the trace of a run that was killed or crashed,
    and the next run takes it over with a warning (this is what `--auto-resume` after a crash
    does). On a file system without locks the run goes on with a warning.
    """

    def __init__(self, output_dir: str, flag: str = "--output_dir"):
        self.output_dir, self.flag = output_dir, flag
        self.path = os.path.join(output_dir, LOCK_NAME) if output_dir else ""
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "OutputDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (no-op without a folder or when held); UserError naming the holder if busy."""
        if self.held or not self.path:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"{self.flag} {self.output_dir} is in use by another run ({_describe_holder(holder)}); "
                                f"wait for it to end or choose another {self.flag}") from None
            except OSError as err:
                os.close(fd)
                _logger.warning(f"cannot lock {self.path} ({err.strerror}): a second run into this folder would "
                                f"not be stopped")
                return
            try:  # the previous holder may have removed the file between our open and our lock
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            _logger.warning(f"taking over {self.output_dir}: the run that held it ({_describe_holder(previous)}) "
                            f"ended without releasing it (killed or crashed)")
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
              "command": " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the file and drop the lock (the file goes first, while still locked)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
