"""Every bad command-line value, config file, data directory or output location gives one line on
stderr and exit code 2 before any training; a forced rerun leaves no stale result; a run over the
cap exits 3 after writing its report."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import one_line_error

from loopgolf.cli import main


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


BAD_VALUES = [
    (["--train", "foo=1"], "unknown train config field"),
    (["--train", 'seq_len="x"'], "seq_len must be int"),
    (["--train", "optim=3"], "optim must be OptimizerConfig"),
    (["--train", 'optim={"matrix_lr": NaN}'], "must be finite"),
    (["--model", 'plan="x"'], "cannot parse plan"),
    (["--model", "rope_base=-1"], "rope_base must be in"),
    (["--model", "model_dim=4194304"], "model_dim must be in"),
    (["--seed", str(2**70)], "seed must be in"),
    (["--time", "nan"], "--time must be a positive, finite"),
    (["--time", "inf"], "--time must be a positive, finite"),
    (["--codec", "zip"], "unknown codec 'zip'"),
    (["--quant", "int99"], ""),
    (["--seq-len", "100000", "--batch-tokens", "100000"], "validation split has"),
]


@pytest.mark.parametrize("extra,message", BAD_VALUES)
def test_bad_values_give_one_line_and_exit_2_before_training(extra, message, text_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(out), "--quiet", *extra], capsys)
    one_line_error(code, err)
    assert message in err
    assert not (out / "log.jsonl").exists()  # refused before the run directory was started


def test_bad_paths_give_one_line(text_dataset, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, message in (
        (["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(a_file), "--quiet"], "is a file"),
        (["run", "--preset", "debug", "--data", str(a_file), "--out", str(tmp_path / "r"), "--quiet"], "is a file, not a dataset directory"),
        (["eval", str(tmp_path), "--data", str(text_dataset)], "directory"),
        (["eval", str(a_file), "--data", str(text_dataset)], "bad magic"),
    ):
        code, err = _run(argv, capsys)
        one_line_error(code, err)
        assert message in err, err


def _config(run_dir):
    return json.loads((run_dir / "config.json").read_text())


def test_resumed_config_with_a_missing_or_unknown_key(text_dataset, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert main(["train", "--preset", "debug", "--data", str(text_dataset), "--out", str(run_dir), "--quiet", "--steps", "2"]) == 0
    good = _config(run_dir)
    for edit, message in (
        (lambda c: c.pop("export"), "missing keys ['export']"),
        (lambda c: c["export"].pop("codec"), "missing field(s) ['codec']"),
        (lambda c: c.__setitem__("surprise", 1), "unknown keys ['surprise']"),
        (lambda c: c["train"].pop("seq_len"), "missing field(s) ['seq_len']"),
        (lambda c: c["train"].__setitem__("nope", 1), "unknown train config field"),
    ):
        cfg = json.loads(json.dumps(good))
        edit(cfg)
        (run_dir / "config.json").write_text(json.dumps(cfg))
        code, err = _run(["run", "--resume", str(run_dir), "--quiet"], capsys)
        one_line_error(code, err)
        assert message in err, err


def test_modified_dataset_is_refused_unless_told(text_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(text_dataset, data)
    val = sorted(data.glob("fineweb_val_*.bin"))[0]
    raw = bytearray(val.read_bytes())
    raw[-2:] = bytes([(raw[-2] + 1) % 256, raw[-1]])
    val.write_bytes(bytes(raw))
    code, err = _run(["run", "--preset", "debug", "--data", str(data), "--out", str(tmp_path / "r"), "--quiet"], capsys)
    one_line_error(code, err)
    assert "does not match the manifest" in err and "--no-verify-data" in err


def test_forced_rerun_removes_the_old_results_first(text_dataset, tmp_path):
    run_dir = tmp_path / "r"
    base = ["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(run_dir), "--quiet", "--checkpoint-every", "4"]
    assert main(base) == 0
    assert (run_dir / "summary.json").exists() and (run_dir / "artifact.lgz").exists() and (run_dir / "checkpoint.pt").exists()
    (run_dir / ".artifact.lgz.abc.tmp").write_bytes(b"half an export")
    # A forced rerun killed during training: nothing of the old run's results may remain.
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    log = run_dir / "log.jsonl"
    log.unlink()  # so that the wait below sees the new run's first step
    proc = subprocess.Popen([sys.executable, "-m", "loopgolf", *base, "--force", "--steps", "100000"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and '"event": "train"' in log.read_text()):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    left = sorted(p.name for p in run_dir.iterdir())
    assert "summary.json" not in left and "artifact.lgz" not in left and ".artifact.lgz.abc.tmp" not in left, left


def test_over_cap_run_writes_its_report_and_exits_3(text_dataset, tmp_path, capsys):
    run_dir = tmp_path / "r"
    code = main(["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(run_dir), "--quiet", "--cap", "1000"])
    err = capsys.readouterr().err
    assert code == 3 and "over the 1,000-byte cap" in err
    assert json.loads((run_dir / "summary.json").read_text())["fits"] is False


def test_a_closed_output_pipe_stops_quietly():
    """`loopgolf presets | head -1`: the reader closes the pipe; loopgolf stops as a program
    killed by SIGPIPE does (status 141), with no traceback and no error line."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "loopgolf", "presets"], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 141 and proc.stderr == ""
