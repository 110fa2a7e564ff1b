"""Process-group setup for torchrun, torch.distributed.launch and Slurm, and small helpers.

The environment decides the mode (as in DeiT's `init_distributed_mode`):
torchrun / launch set RANK, WORLD_SIZE and LOCAL_RANK; a Slurm task without them
uses SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, and MASTER_ADDR defaults to the
first host of SLURM_NODELIST. One process and no environment: not distributed.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from models.compiling import unwrap_model  # noqa: F401  (one definition, in the model library)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def first_slurm_host(nodelist: str) -> str:
    """First host name of a compressed Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _read_env_layout() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or Slurm variables, or None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    # Only inside an srun step (SLURM_STEP_ID is set): the batch script itself also has
    # SLURM_PROCID=0 and SLURM_NTASKS, and must not wait for ranks that never start.
    slurm_world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and slurm_world > 1:
        rank, world = int(env["SLURM_PROCID"]), slurm_world
        local = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))))
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
        return rank, world, local
    return None


def init_distributed_mode(args) -> None:
    """Set args.distributed, rank, world_size, gpu, dist_backend; init the process group."""
    layout = _read_env_layout()
    if layout is None or layout[1] <= 1:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    args.rank, args.world_size, args.gpu = layout
    args.distributed = True
    on_cuda = str(args.device).startswith("cuda")
    if args.dist_backend in (None, "auto"):
        args.dist_backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    timeout = timedelta(minutes=30)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and args.dist_url == "env://":
        # torchrun (--max-restarts) hands every attempt the same key-value store: without a
        # per-attempt prefix the restarted ranks read the dead ranks' addresses and never connect.
        store, _, _ = next(dist.rendezvous(args.dist_url, args.rank, args.world_size, timeout=timeout))
        dist.init_process_group(backend=args.dist_backend, store=dist.PrefixStore(f"attempt_{restart}", store),
                                world_size=args.world_size, rank=args.rank, timeout=timeout)
    else:
        dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank, timeout=timeout)
    dist.barrier()
    _record_rank_processes()


# (host, pid) of every rank of this process group, rank order: which rank a lost connection was to.
_RANK_PROCESSES: list = []
# Errors of a collective whose peer process is gone (gloo, NCCL, the TCP store).
_LOST_PEER_TEXTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                    "NCCL communicator was aborted", "remote process exited", "Socket Timeout")


def _record_rank_processes() -> None:
    processes = [None] * get_world_size()
    dist.all_gather_object(processes, (socket.gethostname(), os.getpid()))
    _RANK_PROCESSES[:] = processes


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # exited, not yet reaped
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lost_peer_message(err: BaseException) -> str | None:
    """One line for a collective that failed because another rank's process died, naming that
    rank when it ran on this host; None for any other error."""
    text = str(err)
    from_backend = isinstance(err, getattr(dist, "DistError", ())) or any(
        name in text for name in ("gloo", "NCCL", "c10d", "Store"))
    if not _RANK_PROCESSES or not from_backend or not any(marker in text for marker in _LOST_PEER_TEXTS):
        return None
    host, me = socket.gethostname(), os.getpid()
    world = len(_RANK_PROCESSES)
    lost = [f"rank {rank} (PID {pid} on {peer_host})" for rank, (peer_host, pid) in enumerate(_RANK_PROCESSES)
            if peer_host == host and pid != me and _process_gone(pid)]
    address = re.search(r"\[([^\]]+)\]:(\d+)", text)
    who = (", ".join(lost) + (" has" if len(lost) == 1 else " have") + " exited" if lost else
           "another rank stopped answering" + (f" ({address.group(1)}:{address.group(2)})" if address else ""))
    return (f"lost a peer of this {world}-process run: {who}; stopping this rank too (the last checkpoint is "
            f"intact: rerun with --auto-resume, or let torchrun --max-restarts restart the group)")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device) -> bool:
    """True when `flag` is True on at least one rank (every rank gets the same answer)."""
    if not is_dist_avail_and_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: SIGTERM/SIGUSR1 (Slurm) and SIGINT (Ctrl-C) sent to the whole
    process group must not kill the workers; the main process handles them and shuts the workers
    down itself.

    The price: multiprocessing's exit handler stops leftover daemon workers with SIGTERM and
    then joins them, which waits forever on these. So whoever iterates such a loader stops its
    workers when the loop ends, error or not: `loader_batches`.
    """
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)


def stop_loader_workers(batches) -> None:
    """Stop the worker processes of a DataLoader iterator now (no-op without workers).

    Needed on the error path: an error raised in a worker comes back as an exception whose
    traceback holds the iterator inside a reference cycle. Left to the garbage collector, the
    iterator's own shutdown either never runs before exit or runs after its index queues were
    already finalised, and the workers (which ignore SIGTERM) wait forever for their stop signal.
    `_shutdown_workers` is idempotent and what the iterator's finaliser calls.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


@contextlib.contextmanager
def loader_batches(loader):
    """`with loader_batches(loader) as batches: for batch in batches: ...`: the loader's workers
    are stopped when the block ends, also when the loop body or a worker raises."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        stop_loader_workers(batches)


class StopRequest:
    """Set by SIGTERM / SIGUSR1 (Slurm preemption or time limit) or Ctrl-C; polled once per step.

    The handler only records the request: the training loop finishes the current
    step, writes a mid-epoch checkpoint and exits 0 so that the job can be requeued.
    A second SIGINT (Ctrl-C pressed again) aborts at once with KeyboardInterrupt, unless
    the checkpoint is already written (`finish`): then the run is exiting with status 0
    as it said, and further signals change nothing.
    """

    def __init__(self):
        self._event = threading.Event()
        self.signal_name = None
        self.finished = False
        self._installed: list = []

    def finish(self) -> None:
        """The stop is complete (checkpoint written, exit status 0 announced): the signals are
        ignored from now on. Ignored, not merely handled: while the interpreter shuts down it puts
        back the default handlers of Python-level ones, and a late Ctrl-C then killed the process
        (status 130) after it had announced status 0."""
        self.finished = True
        if threading.current_thread() is threading.main_thread():
            for signum in self._installed:
                signal.signal(signum, signal.SIG_IGN)

    def request(self, signal_name: str = "request") -> None:
        self.signal_name = signal_name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def install(self, signals=("SIGTERM", "SIGUSR1", "SIGINT")) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in signals:
            signum = getattr(signal, name, None)
            if signum is not None:
                signal.signal(signum, lambda num, frame, n=name: self._on_signal(n))
                self._installed.append(signum)

    def _on_signal(self, name: str) -> None:
        if self.finished:
            return
        if name == "SIGINT" and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.request(name)
