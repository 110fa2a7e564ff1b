"""Logging set up once per process, progress meters, and the machine-readable logs.

Rank 0 logs INFO to the console, other ranks only warnings; every rank writes its
own `log_rank{r}.txt` (as Swin's logger does). Lines logged before the output
directory exists (it is created only once construction succeeded, so a bad command
line writes nothing) are buffered and flushed into the file when it is attached.
`log.txt` keeps DeiT's JSON-lines format for machines.
"""
from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import time
from collections import defaultdict, deque

import torch

from utils.distributed import all_reduce_sum, is_dist_avail_and_initialized, loader_batches

_FORMAT = "[%(asctime)s %(name)s r{rank}] %(levelname)s %(message)s"
_HANDLER_TAG = "_spine_handler"


def _tagged(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _HANDLER_TAG, True)
    return handler


def setup_logging(output_dir: str | None = None, rank: int = 0, level: int = logging.INFO) -> None:
    """Console handler (rank 0: INFO, others: WARNING) plus the per-rank file.

    Without `output_dir` the lines are buffered until `attach_log_file` is called.
    Calling it again replaces the handlers it installed before.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    fmt = logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    console = _tagged(logging.StreamHandler())
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    root.addHandler(console)
    if output_dir:
        attach_log_file(output_dir, rank)
    else:
        buffer = _tagged(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
        buffer.setFormatter(fmt)
        buffer.is_startup_buffer = True
        root.addHandler(buffer)


def attach_log_file(output_dir: str, rank: int) -> str:
    """Start writing `output_dir/log_rank{rank}.txt`, including the buffered lines."""
    root = logging.getLogger()
    path = os.path.join(output_dir, f"log_rank{rank}.txt")
    file_handler = _tagged(logging.FileHandler(path, mode="a"))
    file_handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S"))
    for handler in list(root.handlers):
        if getattr(handler, "is_startup_buffer", False):
            handler.setTarget(file_handler)
            handler.flush()
            root.removeHandler(handler)
    root.addHandler(file_handler)
    return path


class _DropMessages(logging.Filter):
    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


def quiet_cpu_compile() -> None:
    """On a machine without CUDA, torch.compile's C++ backend imports torch.utils.cpp_extension,
    which warns "No CUDA runtime is found, using CUDA_HOME=..." whenever a CUDA toolkit is
    installed: irrelevant to a CPU run, and it reads like a failure. That one warning is dropped."""
    if torch.cuda.is_available():
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages("No CUDA runtime is found"))


def append_json_line(path: str, record: dict) -> None:
    """One line of DeiT's log.txt (default json separators, key order as given)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def make_tensorboard_writer(output_dir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        from utils.errors import UserError
        raise UserError(f"--tensorboard needs tensorboardX ({err}); pip install tensorboardX or drop the flag") from err
    return SummaryWriter(logdir=os.path.join(output_dir, "tensorboard"))


class SmoothedValue:
    """Window median/average plus the global (count-weighted) average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64,
                         device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        all_reduce_sum(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(torch.tensor(list(self.deque)).mean().item()) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """DeiT's progress logger, through `logging`: ETA, meters, time, data, images/s, max mem."""

    def __init__(self, delimiter: str = "  ", logger: logging.Logger | None = None):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.logger = logger or logging.getLogger("train")

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, n: int = 1, **kwargs) -> None:
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[key].update(float(value), n=n)

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def global_averages(self) -> dict:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = "", total: int | None = None,
                  start_index: int = 0, batch_size: int | None = None):
        """Yield items of `iterable`, logging progress every `print_freq` items.

        `start_index` offsets the displayed position (mid-epoch resume). The iterator's worker
        processes are stopped when the loop ends: use it under `contextlib.closing` so that
        this also happens when the loop body raises.
        """
        total = total if total is not None else len(iterable) + start_index
        width = len(str(total))
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        i = start_index
        with loader_batches(iterable) as items:
            for obj in items:
                data_time.update(time.time() - end)
                yield obj
                iter_time.update(time.time() - end)
                i += 1
                if print_freq > 0 and (i % print_freq == 0 or i == total):
                    eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                    parts = [f"{header} [{i:>{width}}/{total}]", f"eta: {eta}", str(self),
                             f"time: {iter_time}", f"data: {data_time}"]
                    if batch_size:
                        parts.append(f"img/s: {batch_size / max(iter_time.avg, 1e-9):.1f}")
                    if torch.cuda.is_available() and torch.cuda.is_initialized():
                        parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}")
                    self.logger.info(self.delimiter.join(parts))
                end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        self.logger.info(f"{header} Total time: {elapsed} ({(time.time() - start) / max(i - start_index, 1):.4f} s / it)")
