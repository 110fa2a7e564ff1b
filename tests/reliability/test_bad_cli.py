"""Bad command lines end with one clear error line and exit status 2, and write nothing:
no output directory, no file in the working directory. All cases run in parallel
subprocesses (the real `python main.py` exit status), then each is checked."""
import os
import subprocess

import pytest
import yaml

from .helpers import MAIN, PYTHON, TINY_FLAGS, error_lines, files_under, subprocess_env

TINY_EVIT = ["--model", "deit_tiny_patch16_shrink_base", "--model-kwargs", "{'depth': 2, 'embed_dim': 32, 'num_heads': 2}",
             "--input-size", "32"]
# name -> (extra flags, words the error line must contain)
CASES = {
    "unknown model": (["--model", "deit_tinyy_patch16_224"], ["unknown --model 'deit_tinyy_patch16_224'",
                                                               "deit_tiny_patch16_224"]),
    "keep rate 1.5": (TINY_EVIT + ["--base_keep_rate", "1.5", "--drop_loc", "(1,)"], ["base_keep_rate", "1.5"]),
    "layer index 12 of 12 blocks": (["--model", "deit_small_patch16_shrink_base", "--model-kwargs", "{}",
                                     "--drop_loc", "(3, 6, 12)"],
                                    ["drop_loc", "12", "0..11"]),
    "unknown YAML key": (["--cfg", "{tmp}/recipe.yaml"], ["unknown key 'lerning_rate'", "recipe.yaml", "close matches"]),
    "output dir under a file": (["--output_dir", "{tmp}/a_file/out"], ["a_file", "not a directory", "--output_dir"]),
    "output dir that cannot be created": (["--output_dir", "/proc/deit_reliability_out"],
                                          ["/proc/deit_reliability_out", "--output_dir"]),
}


def _case_flags(name, tmp):
    flags, _ = CASES[name]
    flags = [f.replace("{tmp}", str(tmp)) for f in flags]
    base = TINY_FLAGS + ["--synthetic-train-size", "64"]
    if not any(f == "--output_dir" for f in flags):
        base += ["--output_dir", str(tmp / "out")]
    return base + flags


@pytest.fixture(scope="module")
def finished_cases(tmp_path_factory):
    """Run every case at once; return name -> (process, its temp dir, files there before)."""
    started = {}
    for name in CASES:
        tmp = tmp_path_factory.mktemp(name.replace(" ", "_"))
        (tmp / "recipe.yaml").write_text(yaml.safe_dump({"epochs": 1, "lerning_rate": 0.1}))
        (tmp / "a_file").write_text("a file, not a folder")
        cwd = tmp / "cwd"
        cwd.mkdir()
        before = files_under(tmp)
        proc = subprocess.Popen([PYTHON, MAIN] + _case_flags(name, tmp), cwd=cwd, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[name] = (proc, tmp, before)
    results = {}
    for name, (proc, tmp, before) in started.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err, tmp, before)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_command_line_is_one_line_exit_2_nothing_written(finished_cases, name):
    returncode, stdout, stderr, tmp, before = finished_cases[name]
    assert returncode == 2, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1, errors
    message = errors[0].split(" ERROR ", 1)[1]
    for word in CASES[name][1]:
        assert word in message, (word, message)
    assert "\n" not in message and "Traceback" not in stderr
    assert files_under(tmp) == before  # no output dir, nothing in the working directory
    assert not os.path.exists("/proc/deit_reliability_out")
