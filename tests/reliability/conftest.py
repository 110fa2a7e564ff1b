"""Fixtures shared by the fault-injection tests."""
import pytest

from .helpers import (TINY_FLAGS, assert_ok, kill_process_group, load_ckpt, run_main, start_main, start_process,
                      wait_for_step)

# Checkpoint every 4 optimizer steps: a kill loses at most 4 steps.
SAVE_EVERY = 4
RESUMABLE_FLAGS = TINY_FLAGS + ["--save-every-iters", str(SAVE_EVERY)]


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory):
    """Output directory of one uninterrupted run with RESUMABLE_FLAGS."""
    out = tmp_path_factory.mktemp("reference")
    assert_ok(run_main(RESUMABLE_FLAGS + ["--output_dir", out]))
    return out


@pytest.fixture(scope="session")
def reference_run(reference_dir):
    """The reference run's final checkpoint: what every interrupted-and-resumed run must
    reproduce bit for bit."""
    return load_ckpt(reference_dir / "checkpoint.pth")


@pytest.fixture
def spawn():
    """Start background runs (`spawn(args, console_path, launcher=...)` or `spawn.process(cmd, console_path,
    env)`); whatever is still running when the test ends is killed with its process group."""
    started = []

    class Spawner:
        def __call__(self, args, log_path, env=None, launcher=None):
            started.append(start_main(args, log_path, env=env, launcher=launcher))
            return started[-1]

        def resumable_run(self, out, console_path, until_step: int):
            """The resumable tiny run into `out`, returned once `until_step` steps are logged."""
            proc = self(RESUMABLE_FLAGS + ["--output_dir", out], console_path)
            wait_for_step(proc, out / "log_rank0.txt", until_step)
            return proc

        def process(self, cmd, log_path, env=None):
            started.append(start_process(cmd, log_path, env))
            return started[-1]

    yield Spawner()
    for proc in started:
        kill_process_group(proc)
