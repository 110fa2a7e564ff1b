"""Broken data: truncated and corrupt JPEG/PNG files, zero-byte files, non-image files and
empty class folders are skipped and counted exactly (build-time report, and a warning with
the paths and the total at the end of each epoch), or fatal with --strict-data (exit 2,
one line naming the file, nothing trained)."""
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from .helpers import PYTHON, TINY_MODEL, error_lines, files_under, read_text, run_main

BATCH = 8


def _image_bytes(fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _corrupt_png(seed: int) -> bytes:
    """A complete PNG whose compressed pixel data is overwritten (bad CRC / zlib stream)."""
    data = bytearray(_image_bytes("PNG", seed))
    start = data.index(b"IDAT") + 8
    data[start:start + 64] = bytes(range(64))
    return bytes(data)


def make_broken_image_folder(root, broken_val: bool = True) -> dict:
    """train/: 13 good images and 3 unreadable ones (16 = 2 batches of 8, so drop_last drops
    nothing), of which two are neighbours in load order (a replacement must not count a file
    twice), plus a zero-byte .jpg, a .txt file and an empty class folder; val/: 6 good images
    and (optionally) one truncated JPEG."""
    train, val = root / "train", root / "val"
    good = [_write(train / "cat" / f"good{i:02d}.jpg", _image_bytes("JPEG", i)) for i in range(7)]
    good += [_write(train / "dog" / f"good{i:02d}.png", _image_bytes("PNG", 10 + i)) for i in range(6)]
    jpeg = _image_bytes("JPEG", 50)
    unreadable = [
        _write(train / "cat" / "bad_truncated.jpg", jpeg[: len(jpeg) // 2]),
        _write(train / "cat" / "bad_random_bytes.jpg", np.random.default_rng(3).bytes(500)),
        _write(train / "dog" / "bad_corrupt.png", _corrupt_png(51)),
    ]
    zero = _write(train / "dog" / "zero.jpg", b"")
    text = _write(train / "cat" / "notes.txt", b"labels were checked by hand")
    (train / "empty_class").mkdir()
    for i, cls in enumerate(["cat", "dog", "cat", "dog", "cat", "dog"]):
        _write(val / cls / f"v{i}.png", _image_bytes("PNG", 100 + i))
    val_unreadable = []
    if broken_val:
        val_unreadable.append(_write(val / "dog" / "v_truncated.jpg", jpeg[: len(jpeg) - 100]))
    return dict(good=good, unreadable=unreadable, zero=zero, text=text, empty=str(train / "empty_class"),
                val_unreadable=val_unreadable)


def _flags(root, out, *extra):
    return TINY_MODEL + ["--data-set", "IMAGEFOLDER", "--data-path", root, "--output_dir", out,
                         "--batch-size", BATCH, "--epochs", "2", "--no-model-ema", "--mixup", "0", "--cutmix", "0",
                         "--reprob", "0", "--aa", "none", "--device", "cpu", "--print-freq", "0",
                         "--no-repeated-aug", "--warmup-epochs", "0", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_broken_files_are_skipped_and_counted_exactly(tmp_path, workers):
    root, out = tmp_path / "data", tmp_path / "out"
    files = make_broken_image_folder(root)
    proc = run_main(_flags(root, out, "--num_workers", workers))
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr

    # Build time: the scan names and counts what can be told without decoding.
    assert re.search(r"train: 16 images; skipped 1 non-image file\(s\), 1 zero-byte file\(s\); "
                     r"1 class folder\(s\) without images", log)
    for kind, path in (("non-image file", files["text"]), ("zero-byte file", files["zero"]),
                       ("class folder without images", files["empty"])):
        assert f"{kind}: {path}" in log

    # Load time: every epoch reports each unreadable training file once, with the total.
    for epoch in (0, 1):
        match = re.search(rf"epoch {epoch}: (\d+) training files could not be read and were replaced: (.*)", log)
        assert match, log[-3000:]
        assert int(match.group(1)) == len(files["unreadable"])
        named = set(match.group(2).split(", "))
        assert named == set(files["unreadable"])

    # Evaluation reports its unreadable file as well.
    val_reports = re.findall(r"(\d+) evaluation files could not be read[^:]*: (.*)", log)
    assert val_reports and all(int(n) == 1 and files["val_unreadable"][0] in paths for n, paths in val_reports)
    assert os.path.exists(out / "checkpoint.pth")
    # The run's own log file keeps the same report.
    assert "3 training files could not be read" in read_text(out / "log_rank0.txt")


@pytest.mark.slow
def test_strict_data_refuses_a_bad_folder_before_training(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    files = make_broken_image_folder(root)
    proc = run_main(_flags(root, out, "--num_workers", "0", "--strict-data"))
    assert proc.returncode == 2
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "--strict-data" in errors[0]
    assert any(path in errors[0] for path in (files["empty"], files["zero"], files["text"]))
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing written


def _folder_with_one_truncated_jpeg(root):
    files = make_broken_image_folder(root, broken_val=False)
    for path in files["unreadable"][1:] + [files["zero"], files["text"]]:
        os.unlink(path)
    os.rmdir(files["empty"])
    _write(root / "train" / "dog" / "extra.png", _image_bytes("PNG", 77))  # keep 2 full batches
    _write(root / "train" / "dog" / "extra2.png", _image_bytes("PNG", 78))
    return files


# With the garbage collector off, the worker's error (and the loader iterator its traceback holds)
# is never freed before exit: the case where exit used to hang on the SIGTERM-immune worker.
_WITHOUT_GC = ["-c", "import gc, runpy, sys; gc.disable(); sys.argv = sys.argv[1:]; "
                     "runpy.run_path(sys.argv[0], run_name='__main__')"]


@pytest.mark.slow
@pytest.mark.parametrize("workers,launcher", [(0, None), (1, None), (1, [PYTHON] + _WITHOUT_GC)],
                         ids=["main-process", "1-worker", "1-worker-gc-off"])
def test_strict_data_stops_at_the_first_unreadable_image(tmp_path, workers, launcher):
    """A folder whose only fault is a truncated JPEG passes the scan; decoding it is fatal."""
    root, out = tmp_path / "data", tmp_path / "out"
    files = _folder_with_one_truncated_jpeg(root)
    proc = run_main(_flags(root, out, "--num_workers", workers, "--strict-data"), timeout=120, launcher=launcher)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, errors
    assert f"unreadable image {files['unreadable'][0]}" in errors[0] and "--strict-data" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "checkpoint.pth" not in files_under(out)
