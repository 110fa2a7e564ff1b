"""Timing, memory and environment measurement of models (the library behind benchmark.py).

Used by `benchmark.py`, `data_bench.py` and the tools. Warm-up iterations, then timed rounds
with the device synchronised at the end of warm-up and of each round only (never per step,
and only on CUDA/MPS); medians with quartiles; peak memory over the timed rounds (CUDA
allocator, or the process's resident set on CPU); batch back-off on out-of-memory; the
matmul peak in a given dtype; and the environment every record names.
"""
from __future__ import annotations

import gc
import importlib.metadata
import logging
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError
from utils.outputs import main_logits
from utils.precision import PRECISIONS, autocast_dtype, autocast_in, cast_for_inference, weights_dtype

_logger = logging.getLogger("benchmark")

__all__ = ["PRECISIONS", "summarize", "synchronize", "compute_dtype", "dtype_name", "training_loss", "make_step",
           "PeakMemory", "measure_models", "measure_inference", "measure_train_step", "is_out_of_memory",
           "run_with_backoff", "measure_peak_gflops", "environment_info", "autocast_dtype", "weights_dtype"]


def summarize(values: Sequence[float]) -> dict:
    """Median, quartiles (inclusive method), IQR, min, max, mean and count."""
    values = sorted(values)
    if len(values) >= 2:
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = median = q3 = values[0]
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": values[0],
            "max": values[-1], "mean": statistics.fmean(values), "n": len(values)}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels; CPU ops are synchronous already. Called per round, never per step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the model's matmuls run in under `precision` (what `--peak` measures)."""
    return weights_dtype(precision) or autocast_dtype(precision, device) or torch.float32


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


_autocast = autocast_in


def _input(model: nn.Module, batch_size: int, img_size, device, channels_last: bool) -> torch.Tensor:
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = getattr(model, "in_chans", None) or 3
    x = torch.randn(batch_size, in_chans, height, width, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


_logits = main_logits


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The model's `num_classes`, else the width of its logits on `x`."""
    base = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if getattr(base, "num_classes", 0):
        return int(base.num_classes)
    with torch.no_grad():
        return int(_logits(base(x[:1])).shape[-1])


def training_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on every logits tensor of a training output (Tensor, tuple or dict)."""
    if isinstance(output, dict):
        loss = training_loss(output["logits"], target)
        return loss + output["aux_loss"] if "aux_loss" in output else loss
    if isinstance(output, (tuple, list)):
        return sum(F.cross_entropy(o.float(), target) for o in output)
    return F.cross_entropy(output.float(), target)


def make_step(model: nn.Module, mode: str, batch_size: int, img_size, device: torch.device,
              precision: str = "fp32", channels_last: bool = False) -> Callable[[], None]:
    """One benchmark iteration: a no-grad forward ('infer') or forward+backward+SGD step ('train')."""
    dtype = autocast_dtype(precision, device)
    x = _input(model, batch_size, img_size, device, channels_last)
    if mode == "infer":
        model.eval()

        def infer_step():
            with torch.no_grad(), _autocast(device, dtype):
                model(x)

        return infer_step
    if mode != "train":
        raise ValueError(f"unknown mode {mode!r}")
    model.eval()
    target = torch.randint(0, _num_classes(model, x), (batch_size,), device=device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 and device.type == "cuda" else None

    def train_step():
        with _autocast(device, dtype):
            loss = training_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return train_step


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory over a region: CUDA allocator on GPU, process peak RSS elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = None
        self.baseline_mb = None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.kind = "cuda_max_memory_allocated"
            return
        gc.collect()
        self.baseline_mb = (_read_status_kib("VmRSS") or 0) / 1024
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            self.kind = "process_peak_rss_reset"
        except OSError:
            self.kind = "process_peak_rss_lifetime"

    def read(self) -> dict:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "process_peak_rss_reset" and _read_status_kib("VmHWM") is not None:
            peak = _read_status_kib("VmHWM") / 1024
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return {"peak_mem_mb": peak, "peak_mem_delta_mb": max(0.0, peak - (self.baseline_mb or 0.0)),
                "peak_mem_kind": self.kind}


def measure_models(models_: Sequence[nn.Module], mode: str, batch_size: int, img_size, device,
                   precision: str = "fp32", channels_last: bool = False, warmup: int = 10,
                   rounds: int = 7, iters_per_round: int = 10) -> list[dict]:
    """Time several models with interleaved rounds (A B, B A, A B, ...); one result per model.

    Peak memory is only reported for a single model (interleaving mixes the peaks).
    `precision="bf16-weights"` casts the models in place (`engine.cast_for_inference`).
    """
    device = torch.device(device)
    if warmup < 0 or rounds < 1 or iters_per_round < 1:
        raise UserError("--warmup must be >= 0 and --rounds, --iters-per-round >= 1")
    for model in models_:
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        cast_for_inference(getattr(model, "_orig_mod", model), weights_dtype(precision))
    steps = [make_step(m, mode, batch_size, img_size, device, precision, channels_last) for m in models_]
    for step in steps:
        for _ in range(warmup):
            step()
    synchronize(device)
    memory = PeakMemory(device) if len(models_) == 1 else None
    if memory is not None:
        memory.reset()
    round_times: list[list[float]] = [[] for _ in steps]
    for round_index in range(rounds):
        # rotate who goes first (A B, B A, A B, ...): cancels drift and any first-in-pair advantage
        shift = round_index % len(steps)
        for index in list(range(len(steps)))[shift:] + list(range(len(steps)))[:shift]:
            start = time.perf_counter()
            for _ in range(iters_per_round):
                steps[index]()
            synchronize(device)
            round_times[index].append(time.perf_counter() - start)
    memory_info = memory.read() if memory is not None else {}
    images = batch_size * iters_per_round
    results = []
    for times in round_times:
        throughput = summarize([images / t for t in times])
        latency = summarize([1000.0 * t / iters_per_round for t in times])
        results.append({
            "mode": mode, "batch_size": batch_size, "precision": precision,
            "autocast_dtype": dtype_name(autocast_dtype(precision, device)),
            "weights_dtype": dtype_name(weights_dtype(precision)) or "float32",
            "channels_last": channels_last, "warmup": warmup, "rounds": rounds,
            "iters_per_round": iters_per_round, "throughput": throughput, "latency_ms": latency,
            "per_image_ms": 1000.0 / throughput["median"], "round_times_s": times, **memory_info,
        })
    return results


def measure_inference(model: nn.Module, batch_size: int, img_size, device, precision: str = "fp32",
                      warmup: int = 10, rounds: int = 7, iters_per_round: int = 10,
                      channels_last: bool = False) -> dict:
    """Inference throughput (images/s, median and spread over rounds), latency and peak memory."""
    return measure_models([model], "infer", batch_size, img_size, device, precision, channels_last,
                          warmup, rounds, iters_per_round)[0]


def measure_train_step(model: nn.Module, batch_size: int, img_size, device, precision: str = "fp32",
                       warmup: int = 10, rounds: int = 7, iters_per_round: int = 10,
                       channels_last: bool = False) -> dict:
    """Training-step throughput (forward, backward, SGD step) like `measure_inference`."""
    return measure_models([model], "train", batch_size, img_size, device, precision, channels_last,
                          warmup, rounds, iters_per_round)[0]


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_backoff(measure: Callable[[int], Any], batch_size: int, enabled: bool = True) -> tuple[Any, int, list[int]]:
    """Call `measure(batch)`, halving the batch on out-of-memory; (result, batch used, failed sizes).

    Re-raises the out-of-memory error when batch 1 fails too (or when disabled).
    """
    failed: list[int] = []
    batch = batch_size
    while True:
        try:
            return measure(batch), batch, failed
        except Exception as error:
            if not is_out_of_memory(error) or not enabled or batch == 1:
                raise
            _logger.warning("out of memory at batch %d; retrying with %d", batch, batch // 2)
            failed.append(batch)
        # outside the handler, so the traceback's frames (and their tensors) are gone
        _release_memory()
        batch //= 2


def measure_peak_gflops(device, size: int | None = None, repeats: int = 5,
                        dtype: torch.dtype = torch.float32) -> dict:
    """Matmul peak in `dtype`: best of `repeats` timings of square `size` matmuls (2 * n^3 flops each)."""
    device = torch.device(device)
    size = size or (4096 if device.type == "cuda" else 2048)
    per_timing = 10 if device.type == "cuda" else 1
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_timing):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / per_timing)
    return {"peak_gflops": 2 * size**3 / best / 1e9, "peak_matmul_size": size, "peak_dtype": dtype_name(dtype),
            "peak_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None}



def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_info(device, malloc_settings: dict | None = None) -> dict:
    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "malloc_settings": dict(malloc_settings or {}),  # utils.host_memory, applied by run()
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "fused_attn": bool(timm.layers.use_fused_attn()),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "fvcore": _version("fvcore"), "torchprofile": _version("torchprofile"),
            "numpy": _version("numpy"), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
        "platform": platform.platform(), "hostname": platform.node(), "git_commit": _git_commit(),
    }
