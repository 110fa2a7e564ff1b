"""Helpers for the end-to-end tests: run main.py in a subprocess with a tiny, fast setup."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# A 1-block ViT with 32-dim tokens on 32 px synthetic shapes: a few seconds per run.
TINY_MODEL = ["--model", "deit_tiny_patch16_224",
              "--model-kwargs", "{'depth': 1, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}",
              "--input-size", "32"]
TINY_RUN = TINY_MODEL + [
    "--data-set", "SYNTHETIC", "--synthetic-train-size", "256", "--synthetic-val-size", "64",
    "--device", "cpu", "--batch-size", "32", "--num_workers", "0", "--print-freq", "0",
    "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--drop-path", "0",
    "--lr", "2e-3", "--unscale-lr", "--warmup-epochs", "0", "--min-lr", "1e-4",
]


def run_main(args, env_extra=None, script="main.py", timeout=300, launcher=None):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    cmd = (launcher or [PYTHON]) + [os.path.join(ROOT, script)] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def state_dicts_equal(a, b, exact=True, atol=0.0):
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if exact and not torch.equal(x, y):
                return False
            if not exact and not torch.allclose(x.float(), y.float(), atol=atol, rtol=0):
                return False
    return True
