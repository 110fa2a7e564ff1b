"""The method-family contract: a method is one file, and main.py, engine.py and benchmark.py
name none (issue "One plugin contract for methods")."""
import json
import os
import re
import subprocess

import pytest
import torch

import benchmark
import main
import toy_family
from models import family
from models.factory import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_RUN = ["--model", "toy_vit", "--input-size", "32", "--data-set", "SYNTHETIC", "--synthetic-train-size", "64",
           "--synthetic-val-size", "32", "--device", "cpu", "--batch-size", "16", "--num_workers", "0",
           "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--print-freq", "2",
           "--warmup-epochs", "0", "--toy-logit-scale", "2.5", "--toy-shift", "0.25"]


def test_the_toy_family_plugs_in_through_the_registry():
    assert family.family_of_model("toy_vit") is toy_family.TOY
    parser = main.build_parser([])
    assert "--toy-logit-scale" in parser._option_string_actions and "--toy_shift" in parser._option_string_actions
    model = create_model("toy_vit", options={"toy_logit_scale": 2.5, "toy_shift": 0.25}, num_classes=10)
    assert model.logit_scale == 2.5 and toy_family.shifted(model)
    hooks = family.training_hooks(model, "toy_vit", main.parse_args(TOY_RUN))
    hooks.on_epoch_start(model, 3)
    assert model.epochs_seen == [3] and hooks.log_state(model) == {"toy_epochs_seen": 1}
    with pytest.raises(main.UserError, match="logit_scale must be > 0"):
        main.build_model(main.parse_args(TOY_RUN[:-4] + ["--toy-logit-scale", "-1"]), 10)


@pytest.mark.slow
def test_toy_family_trains_evaluates_and_benchmarks_through_the_entry_functions(tmp_path, caplog):
    out = tmp_path / "out"
    caplog.set_level("INFO")
    assert main.cli(TOY_RUN + ["--epochs", "2", "--output_dir", str(out)]) == 0
    with open(out / "log.txt") as f:
        log = [json.loads(line) for line in f]
    assert [rec["method"]["toy_epochs_seen"] for rec in log] == [1, 2]
    assert any("toy_epochs_seen" in r.getMessage() and "Epoch: [1]" in r.getMessage() for r in caplog.records)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["toy_logit_scale"] == 2.5

    assert main.cli(TOY_RUN + ["--eval", "--resume", str(out / "checkpoint.pth")]) == 0
    assert any("Accuracy of the network on the 32 test images" in r.getMessage() for r in caplog.records)

    records_path = tmp_path / "bench.jsonl"
    code = benchmark.main(["--model", "toy_vit", "--toy-logit-scale", "2.5", "--toy-shift", "0.25", "--img-size", "32",
                           "-b", "2", "--rounds", "1", "--iters-per-round", "1", "--warmup", "1",
                           "--output", str(records_path)])
    assert code == 0
    with open(records_path) as f:
        record = json.loads(f.readline())
    assert record["model"] == "toy_vit" and record["throughput"]["median"] > 0
    assert record["model_kwargs"]["logit_scale"] == 2.5 and record["model_kwargs"]["toy_shift"] == 0.25


def test_a_plugin_module_is_imported_by_name_and_a_missing_one_is_one_line(tmp_path):
    (tmp_path / "my_method.py").write_text(
        "from models import family\n"
        "family.register_family(family.MethodFamily(name='my_method', title='mine', flags=(\n"
        "    family.Flag('--my-knob', type=int, default=3, help='a knob'),)))\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    code = "import main; a = main.parse_args(['--plugin', 'my_method', '--my-knob', '5']); print(a.my_knob)"
    proc = subprocess.run([main.sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "5", proc.stderr
    with pytest.raises(main.UserError, match="--plugin no_such_method: no such module"):
        main.parse_args(["--plugin", "no_such_method"])


def test_two_families_cannot_declare_one_flag():
    with pytest.raises(ValueError, match="already declared"):
        family.register_family(family.MethodFamily(name="clash", title="clash", flags=(
            family.Flag("--toy-shift", type=float, help="again"),)))


def test_trainer_engine_and_benchmark_name_no_method():
    """`git grep -niE "evit|tome|ltm|lambda|shrink|raftmlp|dwnet"` on the three files finds only
    help strings, docstrings, comments and Python's own `lambda`."""
    pattern = re.compile(r"evit|tome|ltm|lambda|shrink|raftmlp|dwnet", re.IGNORECASE)
    offending = []
    for name in ("main.py", "engine.py", "benchmark.py"):
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        code = _code_only(text)
        for number, line in enumerate(code.splitlines(), 1):
            stripped = re.sub(r"\blambda\b(?=[^:]*:)", "", line)  # Python lambdas
            if pattern.search(stripped):
                offending.append(f"{name}:{number}: {line.strip()}")
    assert offending == []


def _code_only(text: str) -> str:
    """Source with comments, docstrings and string literals blanked (line numbers kept)."""
    import io
    import tokenize
    lines = text.splitlines(keepends=True)
    out = [list(line) for line in lines]
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            (r0, c0), (r1, c1) = tok.start, tok.end
            for row in range(r0, r1 + 1):
                start = c0 if row == r0 else 0
                end = c1 if row == r1 else len(lines[row - 1])
                for col in range(start, min(end, len(out[row - 1]))):
                    if out[row - 1][col] != "\n":
                        out[row - 1][col] = " "
    return "".join("".join(chars) for chars in out)


def test_only_flags_given_away_from_their_default_warn_on_another_familys_model(caplog):
    plain = ["--model", "deit_tiny_patch16_224", "--input-size", "32", "--model-kwargs",
             "{'depth': 1, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}", "--device", "cpu"]
    caplog.set_level("WARNING")
    main.build_model(main.parse_args(plain), 10)  # LTMP's --tau has a default (0.5): not "given"
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]
    main.build_model(main.parse_args(plain + ["--tau", "0.3", "--tome-r", "2"]), 10)
    warnings = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert warnings == ["--tau has no effect on --model deit_tiny_patch16_224 (not an option of its family)"]


def test_benchmark_takes_plugin_as_main_does(tmp_path):
    """A fresh process: `--plugin toy_family` registers the toy model and its flag before parsing."""
    import sys
    out = tmp_path / "flops.jsonl"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmark.py", "--plugin", "toy_family", "--model", "toy_vit",
                           "--toy-logit-scale", "2", "--img-size", "32", "--flops-only", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["model_kwargs"]["logit_scale"] == 2.0
    bad = subprocess.run([sys.executable, "benchmark.py", "--plugin", "no_such_module", "--model", "toy_vit"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--plugin no_such_module: no such module" in bad.stderr
    assert "Traceback" not in bad.stderr
