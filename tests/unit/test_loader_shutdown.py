"""DataLoader workers ignore SIGTERM (utils.distributed.ignore_stop_signals), so the loops that
iterate them must stop them when the loop ends, whichever way it ends; otherwise the interpreter's
exit waits forever for them (seen in CI as a strict-data run hanging after its error line)."""
import contextlib
import multiprocessing

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from utils import distributed as dist_utils
from utils.logger import MetricLogger


class _FailsAt(Dataset):
    def __init__(self, bad_index: int):
        self.bad_index = bad_index

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index == self.bad_index:
            raise ValueError(f"sample {index} is broken")
        return torch.full((2,), float(index))


def _loader(bad_index: int) -> DataLoader:
    return DataLoader(_FailsAt(bad_index), batch_size=2, num_workers=1,
                      worker_init_fn=dist_utils.ignore_stop_signals)


def _workers_alive():
    return [p for p in multiprocessing.active_children() if p.is_alive()]


@pytest.mark.parametrize("where", ["worker", "loop body", "early exit"])
def test_log_every_stops_the_workers_however_the_loop_ends(where):
    assert not _workers_alive()
    loader = _loader(bad_index=2 if where == "worker" else -1)
    with pytest.raises(ValueError) if where != "early exit" else contextlib.nullcontext():
        with contextlib.closing(MetricLogger().log_every(loader, print_freq=0)) as batches:
            for step, batch in enumerate(batches):
                if where == "loop body" and step == 1:
                    raise ValueError("the training step failed")
                if where == "early exit" and step == 1:
                    break
    # The exception (and its traceback, which holds the iterator) is still alive here.
    assert not _workers_alive()


def test_stop_loader_workers_is_a_no_op_without_workers():
    batches = iter(DataLoader(_FailsAt(-1), batch_size=2, num_workers=0))
    next(batches)
    dist_utils.stop_loader_workers(batches)
    assert next(batches).shape == (2, 2)
