"""Every model this project registers trains one epoch and evaluates through main.py.

Tiny settings: a handful of 32-64 px synthetic images and each family's smallest
configuration (`--model-kwargs`). One subprocess per family runs `main.cli` for each of
its models in turn, so the import cost is paid once.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import timm

import models  # noqa: F401
from e2e_utils import ROOT
from models import family

def _example_flags(example):
    flags = list(example.flags) + ["--input-size", str(example.input_size)]
    if example.kwargs:
        flags += ["--model-kwargs", repr(dict(example.kwargs))]
    return flags


# family -> [(example name, main.py flags)]: every family's Examples that train (`family.Example.train`)
RUNS = {f.name: [(e.name, ["--model", e.model, *_example_flags(e)]) for e in f.examples if e.train]
        for f in family.families()}
RUNS = {name: runs for name, runs in RUNS.items() if runs}

COMMON = ["--data-set", "SYNTHETIC", "--synthetic-train-size", "16", "--synthetic-val-size", "8",
          "--device", "cpu", "--batch-size", "8", "--num_workers", "0", "--epochs", "1", "--print-freq", "0",
          "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--no-model-ema", "--warmup-epochs", "0"]

RUNNER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.getcwd())
    import main
    results = {}
    for name, argv in json.loads(sys.argv[1]):
        code = main.cli(argv)
        log = os.path.join(argv[argv.index("--output_dir") + 1], "log.txt")
        lines = open(log).read().splitlines() if os.path.exists(log) else []
        records = [json.loads(line) for line in lines]
        epochs = [r for r in records if "epoch" in r]  # LTMP also writes an end-of-training report line
        results[name] = {"code": code, "log": epochs[-1] if epochs else None,
                         "reports": [r.get("report") for r in records if "report" in r]}
    print("RESULTS " + json.dumps(results))
""")


def _registered_by(f):
    module = f.module.rsplit(".", 1)[-1]
    return {name for name in timm.list_models(module=module) if f.owns(name)}


def test_every_registered_project_model_is_covered():
    """Each model family's Examples train every model it registers (aliases of one entry point aside)."""
    for f in family.families():
        if f.is_patch() or not f.module.startswith("models."):
            continue
        trained = {e.model for e in f.examples if e.train}
        entry_points = {}
        for name in _registered_by(f):
            entry_points.setdefault(timm.models.model_entrypoint(name), set()).add(name)
        missing = [sorted(names) for names in entry_points.values() if not names & trained]
        assert not missing, f"{f.name}: no training Example for {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("family_name", sorted(RUNS))
def test_family_trains_and_evaluates_through_main(family_name, tmp_path):
    jobs = [(name, [*flags, *COMMON, "--output_dir", str(tmp_path / name)]) for name, flags in RUNS[family_name]]
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(jobs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    marker = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and marker, proc.stderr[-4000:]
    results = json.loads(marker[0][len("RESULTS "):])
    for name, result in results.items():
        assert result["code"] == 0, f"{name} exited {result['code']}:\n{proc.stderr[-4000:]}"
        log = result["log"]
        assert log is not None and log["epoch"] == 0, name
        assert log["train_loss"] == log["train_loss"] and 0 <= log["test_acc1"] <= 100, name  # finite, evaluated
        if family_name == "ltmp" and name.startswith("ltmp_"):  # the realised-FLOPs report of the inference twin
            assert result["reports"] == ["ltmp"], name
