"""MCTF's `--eval --r_evals [r1, r2, ...]` (docs/methods/mctf.md, "Evaluation"): the official
evaluation loop over reductions, as a main.py command (`models.mctf.MCTFHooks.commands`).

For every r of `--r_evals`, on the already patched and loaded model: fvcore GMACs at batch 1
(`models.flops`), inference throughput, and top-1/top-5 on the validation set (main.py's
`engine.evaluate`, the run's precision). One JSON line per run, as the official
`result.txt` (`{"model", "resume", "mctf_type", "activate_layer", "r", "throughput", "flops",
"acc1", "acc5"}`), is appended to `<output_dir>/result.txt` (the directory is created; the
official code wrote to `./result/result.txt` without creating it) and logged.

Throughput: official batch 256, fp16 autocast, 200 runs of which 50 are warm-up, on CUDA; on
a CPU a short measurement (batch 8, fp32 or the run's precision, 1 warm-up and 3 timed runs)
so the command stays quick; `benchmark.py` is the place for careful timing.
"""
from __future__ import annotations

import json
import logging
import os

import torch

_logger = logging.getLogger("mctf")


def _throughput(model: torch.nn.Module, context) -> float:
    from utils.measure import measure_inference
    device = torch.device(context.device)
    if device.type == "cuda":
        batch, precision, warmup, rounds = 256, "fp16", 50, 15
    else:
        batch, warmup, rounds = 8, 1, 3
        precision = "bf16" if getattr(context, "amp", False) else "fp32"
    result = measure_inference(model, batch, context.input_size, device, precision=precision, warmup=warmup,
                               rounds=rounds, iters_per_round=10 if device.type == "cuda" else 1)
    return float(result["throughput"]["median"])


def run_r_evals(model: torch.nn.Module, context) -> dict:
    """Evaluate `model` (MCTF-patched) at each r of `context.r_evals`; returns the JSON record."""
    from engine import evaluate
    from models import flops, mctf

    record = {"model": context.model, "resume": getattr(context, "resume", ""), "mctf_type": context.mctf_type,
              "activate_layer": context.activate_layer, "r": [], "throughput": [], "flops": [], "acc1": [],
              "acc5": []}
    original = model.r
    was_training = model.training
    try:
        for r in context.r_evals:
            model.r = r
            _logger.info(f"---------- r_eval: {r} ----------")
            gmacs = flops.count_flops(model, context.input_size)["gmacs"]
            images_per_second = _throughput(model, context)
            stats = evaluate(context.data_loader, model, context.device, context)
            record["r"].append(r)
            record["flops"].append(round(gmacs, 4))
            record["throughput"].append(round(images_per_second))
            record["acc1"].append(round(stats["acc1"], 3))
            record["acc5"].append(round(stats["acc5"], 3))
            _logger.info(f"r {r}: {gmacs:.4f} GMACs, {images_per_second:.0f} im/s, Acc@1 {stats['acc1']:.3f}")
    finally:
        model.r = original
        model.train(was_training)
        assert mctf.is_patched(model)
    line = json.dumps(record)
    if context.output_dir:
        os.makedirs(context.output_dir, exist_ok=True)
        path = os.path.join(context.output_dir, "result.txt")
        with open(path, "a") as f:
            f.write(line + "\n")
        _logger.info(f"--r_evals results appended to {path}")
    _logger.info(line)
    return record
