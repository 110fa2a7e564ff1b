"""benchmark.py --data-loading (data_bench.py): decode, per-worker transform and DataLoader rates on a
tiny folder of JPEGs generated here; the recipe reaches the transform; bad folders are one error line."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import benchmark
import data_bench

FAST = ["--images", "4", "--rounds", "2", "--warmup", "1"]
TINY_RECIPE = "--input-size 40 --batch-size 2"


def write_jpegs(folder, count=6, size=(80, 60), seed=0):
    """Small JPEGs: a smooth random pattern plus noise (decodes like a photo, not a flat colour)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(count):
        low = Image.fromarray(rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(low, dtype=np.float32) + rng.normal(0, 10, size=(height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return folder


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def error_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_mode_reports_every_rate_and_setting(tmp_path, capsys):
    folder = write_jpegs(str(tmp_path / "images"))
    out = tmp_path / "data.jsonl"
    code = benchmark.main(["--data-loading", folder, "--workers", "0", "1", *FAST, f"--recipe={TINY_RECIPE}",
                           "--output", str(out), "--csv", str(tmp_path / "data.csv")])
    assert code == 0
    records = read_jsonl(out)
    assert [(r["measurement"], r["workers"]) for r in records] == [
        ("decode", None), ("transform", None), ("loader", 0), ("loader", 1)]
    for record in records:
        assert record["kind"] == "data" and record["error"] is None
        assert record["throughput"]["median"] > 0 and record["throughput"]["n"] == 2
        assert record["per_image_ms"] > 0 and len(record["round_times_s"]) == 2
        assert record["data_dir"] == folder and record["layout"] == "files" and record["files"] == 6
        assert record["median_source_size"] == [80, 60]
        assert record["recipe"]["input_size"] == 40 and record["recipe"]["batch_size"] == 2
        assert record["recipe"]["aa"] == "rand-m9-mstd0.5-inc1"  # DeiT's default recipe
        assert record["recipe_argv"] == ["--input-size", "40", "--batch-size", "2"]
        assert "RandomResizedCrop" in record["transform"] and "RandAugment" in record["transform"]
        assert record["images_per_round"] == 4 and record["rounds"] == 2
        assert record["versions"]["torch"] and record["device_name"] and record["cpu_cores"] >= 1
    decode, transform, main_process, one_worker = records
    assert decode["warmup_images"] == 1 and transform["threads"] == 1
    for loader in (main_process, one_worker):
        assert loader["batch_size"] == 2 and loader["collate"] == "datasets.collate_skipping"
        assert loader["warmup_batches"] >= 1 and loader["first_batch_s"] > 0
        assert loader["throughput_per_worker"] > 0 and loader["skipped_unreadable"] == 0
    assert one_worker["warmup_batches"] == main_process["warmup_batches"] + data_bench.PREFETCH_FACTOR
    table = capsys.readouterr().out
    assert "DataLoader, 1 worker" in table and "decode + transform" in table and "6 files" in table
    assert (tmp_path / "data.csv").read_text().count("\n") == 5  # header + one row per record


def test_image_folder_root_and_recipe_flags_reach_the_transform(tmp_path):
    root = tmp_path / "imagenet"
    write_jpegs(str(root / "train" / "cat"), count=3)
    write_jpegs(str(root / "train" / "dog"), count=3, seed=1)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("input_size: 36\nbatch_size: 4\n")
    records = data_bench.run(str(root), f"--cfg {cfg} --ThreeAugment --color-jitter 0.4", workers=[0], images=4,
                             warmup=1, rounds=2)
    assert [r["measurement"] for r in records] == ["decode", "transform", "loader"]
    loader = records[-1]
    assert loader["layout"] == "imagefolder" and loader["files"] == 6  # the text file is not an image
    assert loader["batch_size"] == 4 and loader["recipe"]["cfg"] == str(cfg) and loader["recipe"]["ThreeAugment"]
    assert "size=(36, 36)" in loader["transform"] and "Solarize" in loader["transform"]
    assert "RandAugment" not in loader["transform"] and "ColorJitter" in loader["transform"]
    assert all(r["throughput"]["median"] > 0 for r in records)


@pytest.mark.parametrize("make, words", [
    (lambda tmp: str(tmp / "missing"), "no such folder"),
    (lambda tmp: (tmp / "text").mkdir() or (tmp / "text" / "a.txt").write_text("x") and str(tmp / "text"),
     "no image files"),
    (lambda tmp: (tmp / "fake").mkdir() or (tmp / "fake" / "a.jpg").write_text("not a jpeg") and str(tmp / "fake"),
     "could be decoded"),
])
def test_bad_folder_is_one_error_line_and_status_2(tmp_path, caplog, make, words):
    folder = make(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert benchmark.main(["--data-loading", folder, "--workers", "0", *FAST, f"--recipe={TINY_RECIPE}"]) == 2
    messages = error_lines(caplog)
    assert len(messages) == 1 and "\n" not in messages[0] and words in messages[0]


@pytest.mark.parametrize("argv, words", [
    (["--recipe=--data-path /somewhere"], "drop it from the recipe"),
    (["--recipe=--data-set CIFAR10"], "not a folder of images"),
    (["--recipe=--no-such-flag 1"], "unrecognized arguments"),
    (["--model", "deit_small_patch16_224"], "measures the input pipeline alone"),
    (["-b", "8"], "the batch size is the recipe's"),
    (["--workers", "-1"], "--workers takes counts >= 0"),
])
def test_bad_settings_are_one_error_line(tmp_path, caplog, argv, words):
    folder = write_jpegs(str(tmp_path / "images"), count=2)
    with caplog.at_level(logging.ERROR):
        assert benchmark.main(["--data-loading", folder, *FAST, *argv]) == 2
    messages = error_lines(caplog)
    assert len(messages) == 1 and words in messages[0]


@pytest.mark.slow
def test_cli_missing_folder_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "benchmark.py", "--data-loading", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=os.path.dirname(benchmark.__file__), timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "no such folder" in errors[0] and "Traceback" not in proc.stderr
