"""tools/plot_equal_flops.py: redraws the equal-FLOPs plot and its table from benchmark records."""
import json

import pytest

from tools import plot_equal_flops


def _record(label_b, model, gmacs, ratio, dest=None, value=None, target=None, flags=None):
    flags = dict(flags or {})
    if dest:
        flags[dest] = value
    base = 25.0
    return {
        "kind": "compare", "label": label_b, "label_a": "deit_small_patch16_224", "label_b": label_b,
        "model": model, "gmacs": gmacs, "flops_counter": "fvcore", "device_name": "test CPU",
        "precision": "fp32", "batch_size": 4, "torch_threads": 1, "rounds": 3, "method_flags": flags,
        "target_gmacs": {"target": target, "dest": dest, "value": value, "gmacs": gmacs} if dest else None,
        "throughput": {"median": base * ratio, "q1": base * ratio - 1, "q3": base * ratio + 1},
        "ratio": {"median": ratio, "min": ratio - 0.05, "max": ratio + 0.05},
        "a": {"gmacs": 4.608, "throughput": {"median": base}},
    }


@pytest.fixture
def records_file(tmp_path):
    records = [
        _record("deit_small_patch16_224", "deit_small_patch16_224", 4.608, 1.01),
        _record("evit 0.8", "deit_small_patch16_shrink_base", 3.50, 1.3, "base_keep_rate", 0.804, 3.5,
                {"fuse_token": True}),
        _record("evit 0.6", "deit_small_patch16_shrink_base", 2.60, 1.7, "base_keep_rate", 0.587, 2.6,
                {"fuse_token": True}),
        _record("tome 3.5", "deit_small_patch16_224", 3.50, 1.2, "tome_r", [8, 8, 7], 3.5),
        _record("tome 2.6", "deit_small_patch16_224", 2.60, 1.6, "tome_r", [14, 13, 13], 2.6),
        {"kind": "compare", "label": "broken", "error": "out of memory", "gmacs": None},
    ]
    path = tmp_path / "equal_flops.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_writes_png_with_methods_and_reference(records_file, tmp_path, capsys):
    out = tmp_path / "plot.png"
    assert plot_equal_flops.main([str(records_file), str(out), "--table"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = plot_equal_flops.read_records(str(records_file))
    assert len(records) == 5  # the failed run is skipped
    assert plot_equal_flops.plot(records, str(tmp_path / "again.png")) == ["EViT (fused)", "ToMe", "DeiT-S (reference)"]
    table = capsys.readouterr().out
    # the solved settings live in the table, one row per run, highest GMACs first within a method
    assert "| EViT (fused) | 3.5 | keep rate 0.804 | 3.500 |" in table
    assert "| ToMe | 2.6 | r = [14,13,13] | 2.600 |" in table
    assert "| DeiT-S (against itself) | 4.6 (none) | - | 4.608 |" in table
    assert table.index("keep rate 0.804") < table.index("keep rate 0.587")


def test_legend_outside_the_axes(records_file, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = {}
    close = plt.close

    def keep(fig):  # inspect the figure before the tool closes it
        fig.canvas.draw()
        ax = fig.axes[0]
        seen["axes"] = ax.get_window_extent()
        seen["legend"] = ax.get_legend().get_window_extent()
        seen["texts"] = [t.get_text() for t in ax.texts]
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    plot_equal_flops.plot(plot_equal_flops.read_records(str(records_file)), str(tmp_path / "p.png"))
    assert seen["legend"].x0 >= seen["axes"].x1  # right of the data, never on it
    assert seen["texts"] == ["DeiT-S"]  # no setting written next to the points


def test_unreadable_input_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert plot_equal_flops.main([str(bad), str(tmp_path / "x.png")]) == 2
    assert plot_equal_flops.main([str(tmp_path / "missing.jsonl"), str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
