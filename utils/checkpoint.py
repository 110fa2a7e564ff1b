"""Checkpoint files: atomic writes, safe reads, and weight loading with clear key errors.

Writing: tensors and plain values only, through a temporary file in the same
directory, fsync, `os.replace`, fsync of the directory; a failed write (disk full)
leaves the previous file intact. Reading: always `torch.load(weights_only=True)`;
the official DeiT / EViT / lambda_vit checkpoints pickle an `argparse.Namespace`
under `args`, so exactly that one class is allow-listed and nothing else, and a
file that needs any other Python global is refused without running it.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import pickle
import random
import re
import tempfile
import zipfile

import numpy as np
import torch
from torch import nn

from models.errors import ModelConfigError
from models.factory import saved_args, state_dict_of  # noqa: F401  (saved_args: the one reader of a checkpoint's args)
from utils.errors import UserError
from utils.model_match import suggest_model_for_keys

_logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- writing

def to_plain(value):
    """Namespaces become dicts, tuples stay, paths become strings (weights_only-loadable)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: str) -> None:
    """Write `state` to `path` atomically; on failure the old `path` is untouched and OSError is raised."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; checkpoints are ordinary files
        with os.fdopen(fd, "wb") as f:
            torch.save(to_plain(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint-{epoch:04d}.pth"


def keep_epoch_copy(checkpoint_path: str, epoch: int, keep: int) -> None:
    """Keep `checkpoint-{epoch:04d}.pth` beside `checkpoint_path` and only the last `keep` of them.

    A hard link costs no space and stays valid when `checkpoint.pth` is later replaced
    (os.replace gives the new file a new inode); copy where links are unsupported.
    """
    if keep <= 0:
        return
    directory = os.path.dirname(os.path.abspath(checkpoint_path))
    target = os.path.join(directory, epoch_checkpoint_name(epoch))
    if os.path.exists(target):
        os.unlink(target)
    try:
        os.link(checkpoint_path, target)
    except OSError:
        save_checkpoint(load_checkpoint_file(checkpoint_path), target)
    history = sorted(glob.glob(os.path.join(directory, "checkpoint-[0-9][0-9][0-9][0-9]*.pth")))
    for old in history[:-keep]:
        os.unlink(old)


# ----------------------------------------------------------------------------- reading

def load_checkpoint_file(path: str):
    """Load a checkpoint safely (weights_only, `argparse.Namespace` allow-listed). UserError if unusable."""
    if isinstance(path, str) and path.startswith(("http://", "https://")):
        raise UserError(f"checkpoint {path} is a URL: this project never downloads weights; download it yourself and pass the file path")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}")
    _check_checkpoint_format(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise UserError(
                f"refusing to load {path}: it contains Python code (GLOBAL {found.group(1)}); "
                "only tensors and plain values are accepted") from None
        raise UserError(f"cannot read checkpoint {path}: not a loadable tensor file "
                        f"({_unpickler_reason(err)}); pass a .pth file written by torch.save") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a checkpoint "
                        f"({_first_sentence(err)}); use an intact copy (e.g. an epoch checkpoint-EEEE.pth)") from None
    except Exception as err:  # noqa: BLE001 - the legacy unpickler fails on garbage with any error type
        raise UserError(f"cannot read checkpoint {path}: the file is corrupt or not a checkpoint "
                        f"({type(err).__name__} while unpickling); pass a .pth file written by torch.save") from None


# torch.save writes a zip archive; files from torch < 1.6 are a pickle (protocol 2: 0x80 0x02).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


def _check_checkpoint_format(path: str) -> None:
    """UserError naming what the file is when it is neither of torch.save's two formats."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as err:
        raise UserError(f"cannot read checkpoint {path}: {err.strerror}") from None
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO):
        return
    if not head:
        raise UserError(f"cannot read checkpoint {path}: the file is empty (truncated); pass a .pth file written by torch.save")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        kind = "neither a zip archive nor a pickle"
    else:
        stripped = text.lstrip()
        kind = "a JSON file" if stripped[:1] in ("{", "[") else "a text file"
        kind += f" (it starts with {stripped.splitlines()[0][:40]!r})" if stripped else ""
    raise UserError(f"cannot read checkpoint {path}: it is {kind}, not a PyTorch checkpoint; "
                    "pass the .pth file written by torch.save (e.g. output_dir/checkpoint.pth of main.py)")


def _unpickler_reason(err: BaseException) -> str:
    """torch's reason without its advice to retry with weights_only=False (never safe for an unknown file)."""
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", str(err))
    if found:
        return found.group(1).strip()[:200]
    line = _first_line(err)
    return "unsupported content" if "weights_only" in line else line


def _first_sentence(err: BaseException, limit: int = 200) -> str:
    """The first sentence of the error (torch's truncated-file error goes on with advice that, cut at
    a fixed length, ended mid-sentence); a longer one is cut at a word with '...'."""
    text = _first_line(err, limit=10_000)
    end = re.search(r"[.!?](\s|$)", text)
    text = text[:end.start()] if end else text
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    return text[0][:limit] if text else type(err).__name__


def extract_state_dict(checkpoint) -> dict:
    """The model weights of a checkpoint (`models.factory.state_dict_of`, the one reader: `model`,
    `state_dict`, `net`, EMA entries; `module.` / `_orig_mod.` prefixes stripped); UserError if none."""
    try:
        return state_dict_of(checkpoint)
    except ModelConfigError as err:
        raise UserError(str(err)) from None


def describe_key_mismatch(model_state: dict, state_dict: dict, shown: int = 4) -> tuple[list, list, list, str]:
    """(missing, unexpected, shape_mismatched, one-line summary)."""
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    mismatched = [k for k in state_dict if k in model_state and tuple(state_dict[k].shape) != tuple(model_state[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:shown])}{', ...' if len(missing) > shown else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:shown])}{', ...' if len(unexpected) > shown else ''})")
    if mismatched:
        desc = [f"{k} {list(state_dict[k].shape)} vs model {list(model_state[k].shape)}" for k in mismatched[:shown]]
        parts.append(f"{len(mismatched)} with other shapes ({', '.join(desc)}{', ...' if len(mismatched) > shown else ''})")
    return missing, unexpected, mismatched, "; ".join(parts)


def _listed(keys: list, shown: int = 12) -> str:
    return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


def describe_finetune(summary, state_dict: dict, model_state: dict) -> list:
    """Log lines for a `--finetune` load (`models.factory.LoadSummary`): the counts, then each key
    left at its initialisation with the reason (its shape differs, e.g. a classifier for another
    class count; or the checkpoint lacks it) and the checkpoint keys dropped."""
    reshaped = [k for k in summary.missing if k in state_dict and tuple(state_dict[k].shape) != tuple(model_state[k].shape)]
    absent = [k for k in summary.missing if k not in reshaped]
    dropped = [k for k in summary.dropped if k not in reshaped]
    lines = [f"{len(summary.loaded)} loaded, {len(summary.resized)} resized, {len(dropped)} dropped, "
             f"{len(absent)} missing" + (f", {len(reshaped)} with another shape (re-initialised)" if reshaped else "")]
    if reshaped:
        first = reshaped[0]
        lines.append(f"shape differs, re-initialised: {_listed(reshaped)} ({first}: checkpoint "
                     f"{list(state_dict[first].shape)}, model {list(model_state[first].shape)})")
    if dropped:
        lines.append(f"dropped {_listed(dropped)}")
    if absent:
        lines.append(f"not in the checkpoint, left at initialisation: {_listed(absent)}")
    return lines


def load_model_weights(model: nn.Module, state_dict: dict, strict: bool = True, model_name: str | None = None):
    """Load weights; with strict=True a mismatch is one UserError naming the keys (and a better-fitting model)."""
    model_state = model.state_dict()
    missing, unexpected, mismatched, summary = describe_key_mismatch(model_state, state_dict)
    if strict and (missing or unexpected or mismatched):
        hint = suggest_model_for_keys(state_dict, model_name)
        fix = f"; these weights fit --model {hint}" if hint else "; check --model and its options, or use --finetune for partial loading"
        raise UserError(f"checkpoint does not fit the model{f' {model_name}' if model_name else ''}: {summary}{fix}")
    if mismatched:
        raise UserError(f"checkpoint tensors have other shapes than the model: {summary}")
    return model.load_state_dict(state_dict, strict=strict)


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """Python, NumPy and torch RNG states as plain values and tensors."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy(), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def preserved_rng():
    """Run code that may draw random numbers without moving the training RNG streams."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
