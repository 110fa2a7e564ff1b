"""scripts/gpu_check.sh: the CPU dry run passes every step (or skips the GradScaler check, which
needs CUDA) and writes summary.md, benchmark.jsonl and benchmark.md; bad invocations are one line."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEPS = ("amp_epoch", "amp_resume", "scaler_restored", "bf16_train", "compile_epoch", "torchrun",
         "benchmark_sweep", "benchmark_table")
SWEEP_LABELS = ("deit_small_patch16_224", "deit_base_patch16_224",
                "deit_small_patch16_shrink_base base_keep_rate=0.7 fuse_token=True", "deit_small_patch16_224 tome_r=13",
                "deit_small_patch16_224_shrink done_layer=[0, 2, 4, 6]", "ltm_vit_small_patch16_224 compression_ratio=0.8",
                "dwnet_tiny_patch4_window7_224", "raftmlp_s")


def run_script(*args, timeout=60):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", SCRIPT, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def summary_rows(path):
    rows = {}
    for line in open(path).read().splitlines():
        match = re.match(r"\| (\w+) \| (PASS|FAIL|SKIP) \| ([\d.]+) \|", line)
        if match:
            rows[match.group(1)] = (match.group(2), float(match.group(3)))
    return rows


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_the_tables(tmp_path):
    out = tmp_path / "check"
    proc = run_script("--dry-run", out, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    rows = summary_rows(out / "summary.md")
    assert tuple(rows) == STEPS
    assert rows.pop("scaler_restored")[0] == "SKIP"  # no GradScaler without CUDA
    assert all(status == "PASS" for status, _ in rows.values()), rows
    for step in STEPS:
        assert f"=== [{step}]" in proc.stdout  # a header per step
    records = [json.loads(line) for line in open(out / "benchmark.jsonl")]
    assert {r["label"] for r in records} == set(SWEEP_LABELS)
    assert all(r["error"] is None and r["throughput"]["median"] > 0 for r in records)
    assert any(r["channels_last"] for r in records) and any(r["compile"] for r in records)
    table = (out / "benchmark.md").read_text()
    assert table.count("\n| `") == len(records) and "| model | precision |" in table
    assert "gloo: process group of 1" in (out / "logs" / "torchrun.log").read_text()


def test_a_non_empty_output_dir_is_refused(tmp_path):
    (tmp_path / "old.txt").write_text("previous run")
    proc = run_script("--dry-run", tmp_path)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "summary.md").exists()


def test_unknown_option_is_one_line(tmp_path):
    proc = run_script("--fast", tmp_path / "x")
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_gpu_mode_without_cuda_says_to_use_the_dry_run(tmp_path):
    proc = run_script(tmp_path / "x")
    assert proc.returncode == 2 and "--dry-run" in proc.stderr and len(proc.stderr.splitlines()) == 1
