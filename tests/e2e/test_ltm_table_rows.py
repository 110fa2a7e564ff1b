"""Every baseline row of the LTM table builds, trains one synthetic epoch through main.py and is
benchmarked (FLOPs at the row's resolution, one timed iteration).

Rows: the method lines of `benchmarks/ltm_table.txt` (ToMe and ToFu on timm's MobileViT-XS/-S and
EfficientViT-B1 at 224 and 288 px, the LTM models) and LTMP on the same backbones (`ltmp_*`
trained, its inference twin benchmarked). The ToMe/ToFu settings are checked against the LTM
table's GMACs (the targets below are the table's numbers, the specification of these rows):
within 1 % where token merging can reach them, and at the floor of what it can reach where not.

Training runs at 64 px (LTMP on MobileViT: 128 px, see `train_size`) on a handful of synthetic images; FLOPs are counted at the row's own
resolution (fvcore, batch 1).
"""
import json
import logging
import math
import os
import shlex

import pytest
import timm

import benchmark
from models import flops
import main
import models  # noqa: F401  (registers the families)
from models.factory import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLE = os.path.join(ROOT, "benchmarks", "ltm_table.txt")

# The LTM table's GMACs for the ToMe / ToFu rows and the LTMP rows, (backbone, px) -> GMACs.
MERGE_TARGETS = {("mobilevit_xs", 224): 0.54, ("mobilevit_s", 224): 1.22,
                 ("efficientvit_b1", 224): 0.47, ("efficientvit_b1", 288): 0.73}
LTMP_TARGETS = {("mobilevit_xs", 224): 0.56, ("mobilevit_s", 224): 1.26,
                ("efficientvit_b1", 224): 0.50, ("efficientvit_b1", 288): 0.76}
REACHABLE = {"mobilevit_s", "efficientvit_b1"}  # MobileViT-XS: 61 % convolutions (docs/hybrid_merging.md)

TRAIN = ["--data-set", "SYNTHETIC", "--synthetic-train-size", "8", "--synthetic-val-size", "4", "--device", "cpu",
         "--batch-size", "4", "--num_workers", "0", "--epochs", "1", "--print-freq", "0", "--mixup", "0",
         "--cutmix", "0", "--aa", "none", "--reprob", "0", "--no-model-ema", "--warmup-epochs", "0"]


def train_size(name: str) -> int:
    """64 px, except LTMP on MobileViT: at 64 px its last transformer stage holds one token per
    sequence, which LTMP's bipartite matching cannot take (no B token); 128 px gives it four."""
    return 128 if name.startswith("ltmp_mobilevit") else 64


def _table_rows():
    """(id, model, method flags, px) for each line of ltm_table.txt that applies a method."""
    rows = []
    with open(TABLE) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            tokens = shlex.split(line)
            size = int(tokens[tokens.index("--img-size") + 1])
            flags = [t for i, t in enumerate(tokens[1:], 1)
                     if t != "--img-size" and tokens[i - 1] != "--img-size"]
            if tokens[0].startswith("inference_ltmp_"):  # LTMP's rows: _ltmp_rows (trained as ltmp_*)
                continue
            if flags or tokens[0].startswith("ltm_"):
                method = "tome" if "--tome-r" in flags else "tofu" if "--tofu-r" in flags else "ltm"
                rows.append((f"{method}-{tokens[0]}-{size}", tokens[0], flags, size))
    return rows


def _ltmp_rows():
    rows = []
    for backbone, size in MERGE_TARGETS:
        name = f"ltmp_{backbone}"
        if name in timm.list_models(name) and f"inference_{name}" in timm.list_models(f"inference_{name}"):
            rows.append((f"ltmp-{backbone}-{size}", name, ["--ltmp-flops-images", "2"], size))
    return rows


ROWS = _table_rows() + _ltmp_rows()


def test_the_table_file_has_every_merging_row():
    methods = {(row_id.split("-")[0], name, size) for row_id, name, _, size in _table_rows()}
    for backbone, size in MERGE_TARGETS:
        assert ("tome", backbone, size) in methods and ("tofu", backbone, size) in methods
    assert {name for _, name, _, _ in _table_rows() if name.startswith("ltm_")} == {
        "ltm_mobilevit_xs", "ltm_mobilevit_s", "ltm_efficientvit_b1"}


def _benchmark_record(argv, tmp_path, tag):
    out = tmp_path / f"{tag}.jsonl"
    assert benchmark.main([*argv, "--output", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["error"] is None
    return record


@pytest.mark.slow
@pytest.mark.parametrize("row_id, name, flags, size", ROWS, ids=[row[0] for row in ROWS])
def test_row_trains_and_is_benchmarked(row_id, name, flags, size, tmp_path, caplog):
    method = row_id.split("-")[0]
    # one synthetic epoch through main.py
    with caplog.at_level(logging.INFO):
        assert main.cli(["--model", name, *flags, *TRAIN, "--input-size", str(train_size(name)),
                         "--output_dir", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    epoch = [line for line in lines if "epoch" in line][-1]  # LTMP appends its FLOPs report after the epoch
    assert epoch["epoch"] == 0 and math.isfinite(epoch["train_loss"]) and 0 <= epoch["test_acc1"] <= 100
    if method in ("tome", "tofu"):
        assert f"{method}_r" in epoch["method"]  # trained with the patch on

    bench_name = f"inference_{name}" if method == "ltmp" else name
    # LTMP: the inference twin with one fixed prune threshold (the table's thresholds come from
    # `--ltmp-threshold auto --target-gmacs G`, minutes per row: benchmarks/ltm_table.txt, README)
    bench_flags = ["--ltmp-threshold", "0.01"] if method == "ltmp" else flags
    record = _benchmark_record(["--model", bench_name, *bench_flags, "--img-size", str(size), "--flops-only",
                                "--counter", "fvcore"], tmp_path, "flops")
    assert record["img_size"] == [size, size] and record["gmacs"] > 0
    backbone = name.replace("ltmp_", "").replace("ltm_", "")
    unreduced = flops.count_flops(create_model(backbone, img_size=size), (size, size), counter="fvcore")["gmacs"]
    if method in ("tome", "tofu"):
        target = MERGE_TARGETS[(backbone, size)]
        if backbone in REACHABLE:
            assert abs(record["gmacs"] - target) <= 0.01 * target, (record["gmacs"], target)
        else:  # not reachable: the row merges all it can, and that is still above the target
            floor = flops.count_flops(create_model(backbone, img_size=size, options={f"{method}_r": 1024}),
                                      (size, size), counter="fvcore")["gmacs"]
            assert record["gmacs"] == pytest.approx(floor, rel=1e-9) and floor > 1.03 * target
    elif method == "ltm":
        assert record["gmacs"] < unreduced
    else:  # LTMP: data-dependent; its importance and matching add a little where nothing is pruned
        assert record["gmacs"] <= 1.01 * unreduced

    timed = _benchmark_record(["--model", bench_name, *bench_flags, "--img-size", str(size), "-b", "1",
                               "--warmup", "0", "--rounds", "1", "--iters-per-round", "1", "--no-flops"],
                              tmp_path, "speed")
    assert timed["throughput"]["median"] > 0 and timed["batch_size"] == 1
