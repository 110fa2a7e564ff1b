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

DEIT_TINY = "{'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}"
RAFT_LEVEL = "{'depth': 1, 'dim': 16, 'patch_size': 8, 'raft_size': 2, 'embedding_kernels': [8]}"

LTMP_HYBRID_KWARGS = {"efficientvit_b1": "{'widths': (8, 8, 16, 16, 32), 'depths': (1, 1, 1, 2, 2), "
                                          "'head_dim': 8, 'head_widths': (32, 32)}"}



def ltmp_flags(name):
    """LTMP: ViTs tiny at 32 px, hybrids at 64 px (EfficientViT narrowed); masked ltmp_* models train
    their thresholds (official lrs), inference_ltmp_* ones the trainer's default groups; 2-image report."""
    base = name.split("ltmp_", 1)[1]
    if base in LTMP_HYBRID_KWARGS:
        flags = ["--model-kwargs", LTMP_HYBRID_KWARGS[base], "--input-size", "64"]
    elif base.startswith("mobilevit"):
        flags = ["--input-size", "64"]
    else:
        flags = ["--model-kwargs", DEIT_TINY, "--input-size", "32"]
    flags += ["--ltmp-flops-images", "2"]
    return flags + (["--lr", "0.000005", "0.005"] if name.startswith("ltmp_") else [])


# family -> [(model name, extra main.py flags)]
RUNS = {
    "shrink": [(name, ["--model-kwargs", DEIT_TINY, "--input-size", "32"]
                + (["--prune_layer", "[0]", "--done_layer", "[1]"] if "lambda" in name or name.endswith("_attn")
                   else ["--done_layer", "[0]"]))
               for name in timm.list_models(module="shrink")],
    "evit": [(name, ["--model-kwargs", DEIT_TINY, "--input-size", "32", "--drop_loc", "(1,)",
                     "--base_keep_rate", "0.5", "--fuse_token"])
             for name in timm.list_models(module="evit")],
    "dwnet": [(name, ["--model-kwargs", "{'depths': (1, 1, 1, 1), 'embed_dim': 16"
                      + (", 'inhomo_heads': (4, 4, 4, 4)}" if name.startswith("iddwnet") else "}"), "--input-size", "64"])
              for name in timm.list_models(module="dwnet")],
    "raftmlp": [(name, ["--model-kwargs",
                        "{'layers': [{'depth': 1, 'dim': 16, 'patch_size': 8}], 'pretrained_image_size': 32}"
                        if name == "raftmlp_org_mixer" else
                        f"{{'layers': [{RAFT_LEVEL}], 'pretrained_image_size': 32}}", "--input-size", "32"])
                for name in timm.list_models(module="raftmlp")],
    "ltm": [
        ("ltm_vit_small_patch16_224", ["--model-kwargs", DEIT_TINY, "--input-size", "32"]),
        ("ltm_vit_base_patch16_224", ["--model-kwargs", DEIT_TINY, "--input-size", "32"]),
        ("ltm_swin_tiny_patch4_window7_224", ["--model-kwargs", "{'embed_dim': 16, 'depths': (2, 2), "
                                              "'num_heads': (1, 2), 'window_size': 4}", "--input-size", "64"]),
        ("ltm_swin_base_patch4_window7_224", ["--model-kwargs", "{'embed_dim': 16, 'depths': (2, 2), "
                                              "'num_heads': (1, 2), 'window_size': 4}", "--input-size", "64"]),
        ("ltm_mobilevit_xs", ["--input-size", "64"]),
        ("ltm_mobilevit_s", ["--input-size", "64"]),
        ("ltm_efficientvit_b1", ["--model-kwargs", "{'widths': (8, 8, 16, 16, 32), 'depths': (1, 1, 1, 2, 2), "
                                 "'head_dim': 8, 'head_widths': (32, 32)}", "--input-size", "64"]),
    ],
    # every LTMP model: the masked ltmp_* ones with the official recipe (thresholds-only lrs), the
    # inference_ltmp_* ones with the trainer's default groups; a 2-image realised-FLOPs report
    "ltmp": [(name, ltmp_flags(name)) for name in timm.list_models(module="ltmp")],
}

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


def test_every_registered_project_model_is_covered():
    covered = {name for runs in RUNS.values() for name, _ in runs}
    registered = {name for module in ("shrink", "evit", "dwnet", "raftmlp", "ltm", "ltmp")
                  for name in timm.list_models(module=module)}
    assert covered == registered


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(RUNS))
def test_family_trains_and_evaluates_through_main(family, tmp_path):
    jobs = [(name, ["--model", name, *flags, *COMMON, "--output_dir", str(tmp_path / name)])
            for name, flags in RUNS[family]]
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
        if family == "ltmp" and name.startswith("ltmp_"):  # the realised-FLOPs report of the inference twin
            assert result["reports"] == ["ltmp"], name
