"""Submit main.py to Slurm with submitit (optional: needs `pip install submitit`).

    python scripts/submitit_train.py --nodes 2 --ngpus 8 --timeout 2880 --partition gpu \
        --job_dir /shared/out/deit_s -- --model deit_small_patch16_224 --data-path /imagenet

Everything after `--` goes to main.py. The job always runs with --auto-resume, so a
requeued job (preemption or time limit, handled by submitit's checkpoint()) continues
from the last checkpoint.pth in --job_dir.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_launcher_args(argv):
    parser = argparse.ArgumentParser("submitit launcher for main.py")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--ngpus", type=int, default=8, help="GPUs (tasks) per node")
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=2880, help="minutes")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--job_dir", required=True, help="output dir and submitit logs (shared file system)")
    if "--" in argv:
        split = argv.index("--")
        return parser.parse_args(argv[:split]), argv[split + 1:]
    return parser.parse_args(argv), []


class Trainer:
    def __init__(self, train_argv):
        self.train_argv = train_argv

    def __call__(self):
        import main
        code = main.cli(self.train_argv)
        if code:
            raise SystemExit(code)

    def checkpoint(self):
        # Called by submitit on preemption / timeout: requeue the same command; --auto-resume continues.
        import submitit
        return submitit.helpers.DelayedSubmission(Trainer(self.train_argv))


def run(argv=None) -> int:
    try:
        import submitit
    except ImportError:
        sys.stderr.write("scripts/submitit_train.py needs submitit (pip install submitit); "
                         "or use scripts/slurm_train.sbatch, which needs nothing extra\n")
        return 2
    launcher, train_argv = parse_launcher_args(sys.argv[1:] if argv is None else argv)
    train_argv = train_argv + ["--output_dir", launcher.job_dir, "--auto-resume"]
    executor = submitit.AutoExecutor(folder=os.path.join(launcher.job_dir, "submitit"), slurm_max_num_timeout=30)
    extra = {"slurm_partition": launcher.partition} if launcher.partition else {}
    executor.update_parameters(
        nodes=launcher.nodes, tasks_per_node=launcher.ngpus, gpus_per_node=launcher.ngpus,
        cpus_per_task=launcher.cpus_per_task, timeout_min=launcher.timeout, slurm_signal_delay_s=120,
        name="deit", **extra)
    job = executor.submit(Trainer(train_argv))
    print(f"submitted job {job.job_id}; logs in {os.path.join(launcher.job_dir, 'submitit')}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
