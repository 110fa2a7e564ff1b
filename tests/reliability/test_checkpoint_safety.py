"""Checkpoints from strangers: every load is `torch.load(weights_only=True)`; a pickle whose
`__reduce__` would write a file is refused with one clear line and the file is never written,
whichever way it reaches the trainer (--resume, --finetune, --auto-resume, --eval, the teacher);
official checkpoints that pickle an `argparse.Namespace` still load (explicit allow-list)."""
import argparse
import ast
import builtins
import os

import pytest
import timm
import torch

from utils.checkpoint import load_checkpoint_file
from utils.errors import UserError

from .helpers import ROOT, TINY_FLAGS, assert_ok, error_lines, run_main

TINY_KWARGS = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32, num_classes=10)


class WritesAFile:
    """Unpickling this runs exec(), which creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _tiny_state_dict():
    return timm.create_model("deit_tiny_patch16_224", **TINY_KWARGS).state_dict()


def _evil_checkpoints(tmp_path):
    """(name, path, marker) for payloads hidden in several places and both file formats."""
    cases = []
    layouts = {
        "top-level entry": lambda m: {"model": _tiny_state_dict(), "epoch": 3, "payload": WritesAFile(m)},
        "inside the Namespace args": lambda m: {"model": _tiny_state_dict(),
                                                "args": argparse.Namespace(lr=1e-3, hook=WritesAFile(m))},
        "instead of a tensor": lambda m: {"model": {**_tiny_state_dict(), "head.bias": WritesAFile(m)}},
    }
    for name, build in layouts.items():
        for zip_format in (True, False):
            tag = f"{name.replace(' ', '_')}_{'zip' if zip_format else 'legacy'}"
            marker = tmp_path / f"pwned_{tag}"
            path = tmp_path / f"{tag}.pth"
            torch.save(build(marker), path, _use_new_zipfile_serialization=zip_format)
            cases.append((tag, path, marker))
    return cases


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    for tag, path, marker in _evil_checkpoints(tmp_path):
        with pytest.raises(UserError) as info:
            load_checkpoint_file(str(path))
        message = str(info.value)
        assert "refusing to load" in message and "exec" in message, (tag, message)
        assert "\n" not in message
        assert not marker.exists(), tag


def test_official_namespace_checkpoint_loads_through_the_allow_list(tmp_path):
    path = tmp_path / "deit_official.pth"
    state = _tiny_state_dict()
    torch.save({"model": state, "epoch": 299, "args": argparse.Namespace(model="deit_tiny_patch16_224",
                                                                          drop_loc=(3, 6, 9), lr=5e-4)}, path)
    ckpt = load_checkpoint_file(str(path))
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].drop_loc == (3, 6, 9)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in state.items())


def _torch_load_calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


def test_every_torch_load_in_the_project_is_weights_only():
    """Parse every project source file: each torch.load call passes weights_only=True literally,
    and nothing calls pickle.load / torch.jit.load / torch.serialization.add_safe_globals."""
    offenders, calls = [], 0
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            with open(path) as f:
                source = f.read()
            tree = ast.parse(source, path)
            for call in _torch_load_calls(tree):
                calls += 1
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0].value, ast.Constant)
                        and weights_only[0].value.value is True):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{call.lineno}")
            for banned in ("pickle.load(", "pickle.loads(", "torch.jit.load(", "add_safe_globals("):
                if banned in source:
                    offenders.append(f"{os.path.relpath(path, ROOT)}: {banned}")
    assert calls >= 2  # utils/checkpoint.py and the RNG exchange in main.py at least
    assert not offenders, offenders


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["--resume", "--finetune", "--auto-resume", "--eval --resume"])
def test_trainer_refuses_a_malicious_checkpoint_with_exit_2(tmp_path, entry):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    evil = {"model": _tiny_state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 0, "payload": WritesAFile(marker)}
    if entry == "--auto-resume":
        out.mkdir()
        path = out / "checkpoint.pth"
        flags = ["--auto-resume"]
    else:
        path = tmp_path / "stranger.pth"
        flags = entry.split() + [path]
    torch.save(evil, path)
    proc = run_main(TINY_FLAGS + ["--synthetic-train-size", "64", "--output_dir", out] + flags)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and f"refusing to load {path}" in errors[0] and "Python code" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    # Nothing written: the refusal comes before the output directory is created or touched.
    assert (sorted(os.listdir(out)) if out.exists() else []) == (["checkpoint.pth"] if entry == "--auto-resume" else [])


@pytest.mark.slow
def test_trainer_finetunes_from_an_official_namespace_checkpoint(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": _tiny_state_dict(), "args": argparse.Namespace(model="deit_tiny_patch16_224")}, path)
    proc = run_main(TINY_FLAGS + ["--synthetic-train-size", "64", "--epochs", "1", "--finetune", path,
                                  "--output_dir", tmp_path / "out"])
    assert_ok(proc)
    assert f"finetune from {path}: " in proc.stderr and " loaded, " in proc.stderr
