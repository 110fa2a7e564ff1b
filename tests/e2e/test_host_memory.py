"""utils.host_memory: glibc malloc keeps freed memory; benchmark.py applies it on CPU."""
import json
import logging
import platform

import pytest

import benchmark
from utils import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_glibc_takes_every_setting():
    applied = host_memory.keep_freed_memory()
    assert applied == {name: value for name, (_, value) in host_memory.SETTINGS.items()}
    assert applied["M_MMAP_THRESHOLD"] == 32 << 20


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_memory() == {}


def test_a_refused_setting_is_reported_and_left_out(monkeypatch, caplog):
    class RefusesTrim:
        @staticmethod
        def mallopt(param, value):
            return 0 if param.value == host_memory.M_TRIM_THRESHOLD else 1

    monkeypatch.setattr(host_memory, "_glibc", lambda: RefusesTrim())
    with caplog.at_level(logging.WARNING, logger="utils.host_memory"):
        applied = host_memory.keep_freed_memory()
    assert set(applied) == {"M_MMAP_THRESHOLD", "M_TOP_PAD"}
    assert "M_TRIM_THRESHOLD" in caplog.text and "refused" in caplog.text


@pytest.mark.parametrize("default_malloc", [False, True])
def test_benchmark_records_the_malloc_settings(tmp_path, default_malloc, monkeypatch):
    calls = []
    monkeypatch.setattr(benchmark, "keep_freed_memory", lambda: calls.append(1) or {"M_TOP_PAD": 1})
    out = tmp_path / "r.jsonl"
    argv = ["--model", "test_vit", "--img-size", "32", "--batch-size", "2", "--warmup", "0", "--rounds", "1",
            "--iters-per-round", "1", "--no-flops", "--device", "cpu", "--output", str(out)]
    assert benchmark.main(argv + (["--default-malloc"] if default_malloc else [])) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["malloc_settings"] == ({} if default_malloc else {"M_TOP_PAD": 1})
    assert calls == ([] if default_malloc else [1])
