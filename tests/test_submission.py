"""`loopgolf submission` and the generated train_gpt.py: self-contained, byte-exact, faithful.

The script is run the way a reviewer runs it: in a subprocess, from a directory holding only the
official FineWeb layout, with no PYTHONPATH and an import hook that fails on any loopgolf module
not served from the script itself. It must reproduce the `loopgolf run` it was made from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import synthetic_documents

from loopgolf.cli import main
from loopgolf.codebytes import COMPRESSORS, FORMS, Bundle, render_script
from loopgolf.export.quantize import RECORD_POLICY
from loopgolf.rundir import RunDir
from loopgolf.submit.entry import OFFICIAL_ENV, _field_default, options_from_env
from loopgolf.submit.records import SubmissionInfo, first_difference, write_records
from loopgolf.util import read_jsonl

ASSETS = Path(__file__).parent / "assets"
SEED = 3

# Runs a script under runpy with installed loopgolf blocked, then lists any loopgolf module that
# did not come from the script (there must be none).
BLOCKED_RUNNER = r"""
import importlib.abc, runpy, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "loopgolf" or name.startswith("loopgolf."):
            raise ImportError("the script imported the installed " + name)
sys.meta_path.insert(0, Blocker())
script = sys.argv[1]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
foreign = sorted(n for n, m in sys.modules.items() if n.split(".")[0] == "loopgolf" and getattr(m.__spec__, "origin", None) != script)
print("FOREIGN", foreign)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def official_layout(tmp_path_factory) -> Path:
    """A directory in the official layout: data/datasets/fineweb10B_sp1024 (shards of synthetic
    text encoded with the official sp1024 tokenizer, BOS-prefixed documents) and
    data/tokenizers/fineweb_1024_bpe.model."""
    import sentencepiece as spm

    from loopgolf.data.shards import write_shard

    root = tmp_path_factory.mktemp("official")
    tok_dir = root / "data" / "tokenizers"
    tok_dir.mkdir(parents=True)
    shutil.copyfile(ASSETS / "tokenizers" / "fineweb_1024_bpe.model", tok_dir / "fineweb_1024_bpe.model")
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "fineweb_1024_bpe.model"))
    docs = synthetic_documents(240, seed=5)
    ids = [[sp.bos_id(), *sp.encode(d)] for d in docs]
    ds = root / "data" / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    write_shard(ds / "fineweb_val_000000.bin", np.concatenate(ids[:30]), vocab_size=1024)
    write_shard(ds / "fineweb_train_000000.bin", np.concatenate(ids[30:]), vocab_size=1024)
    return root


@pytest.fixture(scope="module")
def reference_run(official_layout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    data = official_layout / "data" / "datasets" / "fineweb10B_sp1024"
    assert main(["run", "--preset", "debug", "--data", str(data), "--out", str(out), "--seed", str(SEED), "--json"]) == 0
    return out


def run_script(script: Path, cwd: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("LOOPGOLF")}
    clean.update(SEED=str(SEED), OUT_DIR=str(out), **env)
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUNNER, str(script)], cwd=cwd, env=clean, capture_output=True, text=True, timeout=600)
    assert "FOREIGN []" in proc.stdout, proc.stdout + proc.stderr
    return proc


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "log.jsonl") if r.get("event") == "train"]


def assert_reproduces(ref: Path, got: Path) -> None:
    want, have = train_losses(ref), train_losses(got)
    assert len(have) == len(want) > 0
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=0)
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((got / "summary.json").read_text())
    assert b["val_bpb_post"] == pytest.approx(a["val_bpb_post"], abs=1e-4)
    assert b["steps"] == a["steps"] and b["model_bytes"] == a["model_bytes"]


def test_plain_script_is_self_contained_byte_exact_and_reproduces_the_run(reference_run, official_layout, tmp_path):
    config = RunDir(reference_run).read_config()
    summary = json.loads((reference_run / "summary.json").read_text())
    script = tmp_path / "train_gpt.py"
    text = render_script(config)
    script.write_text(text, encoding="utf-8")
    assert script.stat().st_size == len(text.encode("utf-8")) == summary["code_bytes"]
    assert Bundle.of(config).code_id == summary["code_id"]
    # No DATA_PATH or TOKENIZER_PATH: the defaults find the official layout under the working directory.
    proc = run_script(script, official_layout, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    got = tmp_path / "out"
    assert_reproduces(reference_run, got)
    run_summary = json.loads((got / "summary.json").read_text())
    assert run_summary["code_bytes"] == script.stat().st_size and run_summary["code_id"] == summary["code_id"]
    assert f"val_bpb:{run_summary['val_bpb_post']:.8f}" in proc.stdout
    assert f"Total submission size: {run_summary['artifact_bytes']} bytes" in proc.stdout


@pytest.mark.parametrize("form,compress", [("minify", None), ("plain", "lzma"), ("minify", "brotli")])
def test_minified_and_compressed_scripts_give_the_same_numbers(reference_run, official_layout, tmp_path, form, compress):
    config = RunDir(reference_run).read_config()
    plain = render_script(config)
    text = render_script(config, form=form, compress=compress)
    assert len(text) < len(plain)
    script = tmp_path / "train_gpt.py"
    script.write_text(text, encoding="utf-8")
    data = official_layout / "data" / "datasets" / "fineweb10B_sp1024"
    # From an empty directory this time, with the data given by the official variables.
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = run_script(
        script, cwd, tmp_path / "out", DATA_PATH=str(data), TOKENIZER_PATH=str(official_layout / "data" / "tokenizers" / "fineweb_1024_bpe.model")
    )
    assert proc.returncode == 0, proc.stderr
    assert_reproduces(reference_run, tmp_path / "out")
    made = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert made["code_bytes"] == script.stat().st_size
    # The script says its own form, and the form is not part of the code id.
    assert made["code_form"] == form + (f"+{compress}" if compress else "")
    assert made["code_id"] == json.loads((reference_run / "summary.json").read_text())["code_id"]


def test_script_reports_bad_settings_and_missing_data(reference_run, tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(render_script(RunDir(reference_run).read_config()), encoding="utf-8")
    proc = run_script(script, tmp_path, tmp_path / "out", ITERATIONS="many")
    assert proc.returncode == 2 and "ITERATIONS='many'" in proc.stderr
    proc = run_script(script, tmp_path, tmp_path / "out")  # no ./data here
    assert proc.returncode == 2 and "fineweb10B_sp1024" in proc.stderr


def test_official_env_names_real_settings_and_parses_them():
    for section, name in OFFICIAL_ENV.values():
        _field_default(section, name)  # raises for a name that is not a loopgolf field
    from loopgolf.codebytes import script_config
    from loopgolf.config import RunConfig, get_preset
    from loopgolf.run import build_config

    config = script_config(RunConfig.from_preset(get_preset("debug")))  # what a script bakes in
    env = {
        "SEED": "7",
        "ITERATIONS": "5",
        "MAX_WALLCLOCK_SECONDS": "0",
        "MATRIX_LR": "0.02",
        "TIE_EMBEDDINGS": "0",
        "RUN_ID": "abc",
        "LOOPGOLF_OVERRIDES": '{"train": {"warmup_steps": 2}}',
    }
    opts = options_from_env(config, env)
    run_config = build_config(opts)
    assert run_config.train.seed == 7 and run_config.train.max_steps == 5
    assert run_config.train.time_budget is None and run_config.train.warmup_steps == 2
    assert run_config.train.optim.matrix_lr == 0.02 and run_config.model.tie_embeddings is False
    assert opts.data == Path("data/datasets/fineweb10B_sp1024") and opts.out == Path("runs/abc")
    assert build_config(options_from_env(config, {})).train.seed == 1337
    for bad, match in [
        ({"TIE_EMBEDDINGS": "maybe"}, "TIE_EMBEDDINGS"),
        ({"MATRIX_LR": "fast"}, "MATRIX_LR"),
        ({"LOOPGOLF_OVERRIDES": "{"}, "not valid JSON"),
        ({"LOOPGOLF_OVERRIDES": '{"data": 1}'}, "JSON object"),
        ({"LOOPGOLF_OVERRIDES": '{"train": 5}'}, "JSON object"),
        ({"LOOPGOLF_OVERRIDES": "[1]"}, "JSON object"),
        ({"LOOPGOLF_OVERRIDES": '{"train": {"optim": 3}}'}, "optim"),
        ({"LOOPGOLF_OVERRIDES": "[" * 100_000}, "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=match):
            options_from_env(config, bad)


def test_unknown_forms_are_refused(reference_run):
    bundle = Bundle.of(RunDir(reference_run).read_config())
    with pytest.raises(ValueError, match="valid: plain, minify"):
        bundle.render("tiny")
    with pytest.raises(ValueError, match="valid: lzma, brotli"):
        bundle.render("plain", "zip")
    assert FORMS == ("plain", "minify") and COMPRESSORS == ("lzma", "brotli")
    from loopgolf.cli import build_parser

    args = build_parser().parse_args(["submission", "r", "--out", "o", "--compress"])
    assert args.compress == "lzma"
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices["submission"]._actions if a.dest == "compress")
    assert tuple(sub.choices) == COMPRESSORS


def set_logged_bpb(run: Path, bpb: float) -> None:
    """Make the log's eval_post record say ``bpb`` (a fake seed's files must agree with each other)."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    for rec in lines:
        if rec.get("event") == "eval_post":
            rec["val_bpb"] = bpb
    (run / "log.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in lines))


def copy_as_seed(run: Path, dest: Path, seed: int, *, config_change=None, summary_change=None) -> Path:
    """A second 'seed' of `run` for the checks that need no training (its numbers are not real)."""
    shutil.copytree(run, dest)
    for name, change in (("config.json", config_change), ("summary.json", summary_change)):
        data = json.loads((dest / name).read_text())
        if name == "summary.json":
            data["seed"] = seed
            data["val_bpb_post"] += 0.01 * seed
            set_logged_bpb(dest, data["val_bpb_post"])
        if change:
            change(data)
        (dest / name).write_text(json.dumps(data))
    return dest


def test_records_folder_layout_and_numbers(reference_run, tmp_path):
    other = copy_as_seed(reference_run, tmp_path / "seed4", 4)
    out = tmp_path / "records" / "2026-12-05_Debug"
    assert main(["submission", str(reference_run), str(other), "--out", str(out), "--author", "A. Tester", "--github-id", "atester"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "submission.json", "train_gpt.py", "train_seed3.log", "train_seed4.log"]
    sub = json.loads((out / "submission.json").read_text())
    s3 = json.loads((reference_run / "summary.json").read_text())
    assert sub["bytes_code"] == (out / "train_gpt.py").stat().st_size == s3["code_bytes"]
    assert sub["seeds"] == [3, 4] and sub["author"] == "A. Tester" and sub["github_id"] == "atester"
    assert sub["val_bpb"] == pytest.approx(s3["val_bpb_post"] + 0.02)
    assert sub["val_bpb_std"] == pytest.approx(np.std([s3["val_bpb_post"], s3["val_bpb_post"] + 0.04], ddof=1))
    assert sub["seed_results"]["3"]["artifact_bytes"] == s3["artifact_bytes"] == s3["model_bytes"] + sub["bytes_code"]
    assert sub["bytes_total"] == sub["artifact_bytes_max"] == s3["artifact_bytes"]
    assert (out / "train_seed3.log").read_bytes() == (reference_run / "log.jsonl").read_bytes()
    readme = (out / "README.md").read_text()
    assert f"| 3 | {s3['val_loss_post']:.8f} | {s3['val_bpb_post']:.8f} |" in readme
    assert "SEED=3 python train_gpt.py" in readme and f"{sub['bytes_code']:,} bytes" in readme
    # Minified and compressed: smaller code, the same runs.
    small = tmp_path / "small"
    assert main(["submission", str(reference_run), "--out", str(small), "--minify", "--compress"]) == 0
    small_sub = json.loads((small / "submission.json").read_text())
    assert small_sub["bytes_code"] == (small / "train_gpt.py").stat().st_size < sub["bytes_code"] // 3
    assert small_sub["seed_results"]["3"]["val_bpb"] == s3["val_bpb_post"]


def test_mismatched_configs_are_refused_naming_the_field(reference_run, tmp_path):
    def wider(c):
        c["model"]["model_dim"] = 64

    other = copy_as_seed(reference_run, tmp_path / "wide", 4, config_change=wider)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"runs differ in model\.model_dim: 32 in .* but 64 in .*wide"):
        write_records([reference_run, other], out, info=SubmissionInfo())
    assert not out.exists()
    assert main(["submission", str(reference_run), str(other), "--out", str(out)]) == 2
    assert not out.exists()
    assert first_difference({"a": {"b": 1}}, {"a": {}}) == ("a.b", 1, "<absent>")
    # Seed and device are not the recipe: runs differing only there are seeds of one config.
    moved = copy_as_seed(reference_run, tmp_path / "gpu", 5, config_change=lambda c: c["train"].update(device="cuda"))
    write_records([reference_run, moved], out, info=SubmissionInfo())


@pytest.mark.parametrize(
    "breakage,match",
    [
        (lambda d: (d / "summary.json").unlink(), "has not finished"),
        (lambda d: (d / "config.json").unlink(), "not a loopgolf run directory"),
        (lambda d: (d / "summary.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "log.jsonl").unlink(), "no log.jsonl"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "uptrain": {"init_from": "x"}})),
            "uptraining run",
        ),
    ],
)
def test_unusable_runs_are_refused(reference_run, tmp_path, breakage, match):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    breakage(run)
    with pytest.raises(ValueError, match=match):
        write_records([run], tmp_path / "out", info=SubmissionInfo())
    assert not (tmp_path / "out").exists()


def test_repeated_seeds_changed_code_and_over_cap_are_refused(reference_run, tmp_path):
    with pytest.raises(ValueError, match="both ran seed 3"):
        write_records([reference_run, copy_as_seed(reference_run, tmp_path / "again", 3)], tmp_path / "out", info=SubmissionInfo())
    stale = copy_as_seed(reference_run, tmp_path / "stale", 3, summary_change=lambda s: s.update(code_id="0" * 64))
    with pytest.raises(ValueError, match="made by other loopgolf code"):
        write_records([stale], tmp_path / "out", info=SubmissionInfo())
    write_records([stale], tmp_path / "out", info=SubmissionInfo(), allow_code_change=True)
    model_bytes = json.loads((reference_run / "summary.json").read_text())["model_bytes"]
    tight = copy_as_seed(reference_run, tmp_path / "tight", 3, config_change=lambda c: c["export"].update(cap_bytes=model_bytes + 1000))
    with pytest.raises(ValueError, match="would exceed the cap.*try --minify"):
        write_records([tight], tmp_path / "out2", info=SubmissionInfo(), allow_code_change=True)
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------------------------
# A run's files are not taken on trust (issue 27)


def edit_summary_raw(run: Path, **raw: str) -> None:
    """Set summary fields to raw JSON text (NaN, Infinity, strings: what a hand edit can write)."""
    data = json.loads((run / "summary.json").read_text())
    for key in raw:
        data[key] = f"@@{key}@@"
    text = json.dumps(data)
    for key, value in raw.items():
        text = text.replace(f'"@@{key}@@"', value)
    (run / "summary.json").write_text(text)


def edit_log(run: Path, change) -> None:
    """Apply ``change(record)`` to every record of the run's log."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    for rec in records:
        change(rec)
    (run / "log.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in records))


def refused(runs: list[Path], out: Path, capsys, *words: str) -> str:
    """The runs are refused by write_records and by the command (exit 2, one line), naming
    `words`, and nothing is written."""
    with pytest.raises(ValueError) as e:
        write_records(runs, out, info=SubmissionInfo())
    assert all(w in str(e.value) for w in words), str(e.value)
    capsys.readouterr()
    assert main(["submission", *map(str, runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not out.exists()
    return err


def test_edited_scores_are_refused(reference_run, tmp_path, capsys):
    """val_bpb_post is what submission.json reports: an edit must not go into it."""
    for key in ("val_bpb_post", "val_loss_post"):
        run = copy_as_seed(reference_run, tmp_path / key, 3, summary_change=lambda s, k=key: s.update({k: s[k] - 0.5}))
        refused([run], tmp_path / "out", capsys, str(run / "summary.json"), f"says {key}", "log recorded")


def test_edited_model_bytes_are_refused(reference_run, tmp_path, capsys):
    def smaller(s):  # consistent with itself: only the artifact tells
        s["model_bytes"] -= 40_000
        s["artifact_bytes"] = s["model_bytes"] + s["code_bytes"]
        s["headroom_bytes"] = s["cap_bytes"] - s["artifact_bytes"]

    run = copy_as_seed(reference_run, tmp_path / "bytes", 3, summary_change=smaller)
    refused([run], tmp_path / "out", capsys, "says model_bytes", f"{run / 'artifact.lgz'} is")
    edit_log(run, lambda r: r.update(model_bytes=r["model_bytes"] - 40_000) if r.get("event") == "export" else None)
    refused([run], tmp_path / "out", capsys, "says model_bytes", "artifact.lgz is")  # the log edited too
    alone = copy_as_seed(reference_run, tmp_path / "alone", 3, summary_change=lambda s: s.update(model_bytes=s["model_bytes"] - 1))
    refused([alone], tmp_path / "out", capsys, "artifact_bytes", "is not model_bytes + code_bytes")


@pytest.mark.parametrize("how", ["missing", "symlink", "directory", "corrupt"])
def test_missing_or_untrustworthy_artifact_is_refused(reference_run, tmp_path, capsys, how):
    run = copy_as_seed(reference_run, tmp_path / "run", 3)
    artifact = run / "artifact.lgz"
    if how == "missing":
        artifact.unlink()
    elif how == "symlink":
        artifact.rename(tmp_path / "elsewhere.lgz")
        artifact.symlink_to(tmp_path / "elsewhere.lgz")
    elif how == "directory":
        artifact.unlink()
        artifact.mkdir()
    else:
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0x01
        artifact.write_bytes(bytes(data))
    words = ["checksum"] if how == "corrupt" else ["has no artifact", "regular file"]
    refused([run], tmp_path / "out", capsys, "artifact.lgz", *words)


@pytest.mark.parametrize("how", ["symlink", "fifo", "directory"])
def test_log_that_is_not_the_runs_own_regular_file_is_refused(reference_run, tmp_path, capsys, how):
    run = copy_as_seed(reference_run, tmp_path / "run", 3)
    log = run / "log.jsonl"
    if how == "symlink":  # the same content, elsewhere: never copied into the folder
        log.rename(tmp_path / "outside.jsonl")
        log.symlink_to(tmp_path / "outside.jsonl")
    elif how == "fifo":
        log.unlink()
        os.mkfifo(log)
    else:
        log.unlink()
        log.mkdir()
    refused([run], tmp_path / "out", capsys, str(log), "not a regular file inside the run directory")


@pytest.mark.parametrize(
    "raw,words",
    [
        ({"val_bpb_post": "NaN"}, ["val_bpb_post must be finite"]),
        ({"val_loss_post": "Infinity"}, ["val_loss_post must be finite"]),
        ({"val_bpb_pre": "-Infinity"}, ["val_bpb_pre must be finite"]),
        ({"train_seconds": "NaN"}, ["train_seconds must be finite"]),
        ({"val_bpb_post": '"1.0"'}, ["val_bpb_post must be float", "'1.0'"]),
        ({"model_bytes": '"42813"'}, ["model_bytes must be int"]),
        ({"steps": "8.5"}, ["steps must be int"]),
        ({"seed": '"3"'}, ["seed must be int"]),
        ({"device": "7"}, ["device must be str"]),
        ({"cap_bytes": "true"}, ["cap_bytes must be int"]),
    ],
)
def test_non_finite_or_mistyped_summary_results_are_refused(reference_run, tmp_path, capsys, raw, words):
    run = copy_as_seed(reference_run, tmp_path / "run", 3)
    edit_summary_raw(run, **raw)
    refused([run], tmp_path / "out", capsys, str(run / "summary.json"), *words)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ("{", "LOOPGOLF_OVERRIDES is not valid JSON"),
        ("NaN", "LOOPGOLF_OVERRIDES must be a JSON object"),
        ('"train"', "LOOPGOLF_OVERRIDES must be a JSON object"),
        ('{"train": null}', "LOOPGOLF_OVERRIDES must be a JSON object"),
        ('{"train": {"optim": null}}', '"optim" an object'),
        ('{"train": {"optim": {"bogus": 1}}}', "unknown optim field(s) ['bogus']"),
        ('{"train": {"nope": 1}}', "unknown train config field(s) ['nope']"),
        ('{"model": {"model_dim": "wide"}}', "model model_dim must be int"),
        ('{"model": {"num_heads": 0}}', "num_heads must be a positive integer"),
        ('{"model": {"plan": 5}}', "model plan must be"),
        ('{"train": {"warmup_steps": NaN}}', "train warmup_steps must be int"),
        ('{"train": {"max_steps": 1e400}}', "train max_steps must be int or null"),
        ('{"train": {"time_budget": Infinity}}', "train time_budget must be finite"),
        ('{"train": {"optim": {"matrix_lr": "fast"}}}', "optim matrix_lr must be float"),
        ('{"model": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}", "LOOPGOLF_OVERRIDES is not valid JSON (RecursionError"),
    ],
)
def test_malformed_overrides_are_one_line_errors(reference_run, tmp_path, capsys, overrides, match):
    """Through the script's entry point: exit 2 and one line naming what is wrong, before any
    data is looked for (the data path here does not exist)."""
    from loopgolf.codebytes import script_config
    from loopgolf.submit import entry

    config = script_config(RunDir(reference_run).read_config())
    env = {"LOOPGOLF_OVERRIDES": overrides, "DATA_PATH": str(tmp_path / "no-data"), "OUT_DIR": str(tmp_path / "out")}
    assert entry.main(config, code_path=__file__, code_id="x", env=env) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_gpt.py: error: ") and err.count("\n") == 1 and match in err, err
    assert "no-data" not in err and not (tmp_path / "out").exists()


def test_script_refuses_malformed_overrides(reference_run, tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(render_script(RunDir(reference_run).read_config()), encoding="utf-8")
    proc = run_script(script, tmp_path, tmp_path / "out", LOOPGOLF_OVERRIDES='{"train": {"optim": [1]}}')
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert 'train_gpt.py: error: LOOPGOLF_OVERRIDES must be a JSON object {"train": {...}, "model": {...}}, with "optim"' in proc.stderr


# --------------------------------------------------------------------------------------------
# Record attempts and the rest: track, dataset, hardware, warnings (issue 27)

H100 = "NVIDIA H100 80GB HBM3"


def on_gpu(run: Path, gpu: str = H100) -> None:
    """Make a copied run look like one made on a GPU (summary and log agree)."""
    data = json.loads((run / "summary.json").read_text())
    data["device"] = "cuda"
    (run / "summary.json").write_text(json.dumps(data))
    edit_log(run, lambda r: r["env"].update(cuda=True, gpu=gpu, gpu_count=1) if r.get("event") == "start" else None)


def test_cpu_run_is_written_as_non_record_with_warnings(reference_run, tmp_path, capsys):
    out = tmp_path / "records"
    assert main(["submission", str(reference_run), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    sub = json.loads((out / "submission.json").read_text())
    summary = json.loads((reference_run / "summary.json").read_text())
    assert sub["track"] == "non_record_16mb" and sub["dataset"] == summary["data"]
    assert sub["dataset"].endswith("fineweb10B_sp1024")  # official data, but on a CPU
    assert sub["hardware"].startswith("1x cpu")
    assert len(sub["record_warnings"]) == 1 and "not GPUs" in sub["record_warnings"][0]
    assert "loopgolf submission: warning: not a valid record attempt" in err and "not GPUs" in err and "non_record_16mb" in err
    readme = (out / "README.md").read_text()
    assert "**Not a valid record attempt:**" in readme and "not GPUs" in readme and "`non_record_16mb`" in readme
    assert f"data {summary['data']}" in readme


def test_gpu_run_on_official_data_is_a_record_attempt(reference_run, tmp_path, capsys):
    run = copy_as_seed(reference_run, tmp_path / "gpu", 3)
    on_gpu(run)
    out = tmp_path / "records"
    assert main(["submission", str(run), "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    sub = json.loads((out / "submission.json").read_text())
    assert sub["track"] == "10min_16mb" and sub["record_warnings"] == []
    assert sub["hardware"] == f"1x {H100}"
    readme = (out / "README.md").read_text()
    assert "Not a valid record attempt" not in readme and H100 in readme


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda run: edit_summary_raw(run, data='"/corpora/my_books"'), "not trained and scored on FineWeb's official data (/corpora/my_books)"),
        (lambda run: edit_summary_raw(run, data='"data/datasets/fineweb10B_sp1024_copy"'), "not trained and scored on FineWeb's official data"),
        (lambda run: edit_summary_raw(run, data='"embedded:python-docs"'), "official data (embedded:python-docs)"),
        (lambda run: edit_summary_raw(run, train_seconds="700.0"), "seed(s) 3 trained for more than 600 s"),
        # The summary says 1.5 s, the log's last train record 700 s: the log counts.
        (
            lambda run: edit_log(run, lambda r: r.update(elapsed=700.0) if r.get("event") == "train" else None),
            "seed(s) 3 trained for more than 600 s",
        ),
        # The summary says CUDA, the log's environment has none.
        (lambda run: edit_log(run, lambda r: r["env"].update(cuda=False) if r.get("event") == "start" else None), "not GPUs"),
    ],
)
def test_runs_that_are_not_record_attempts_are_marked(reference_run, tmp_path, capsys, change, words):
    run = copy_as_seed(reference_run, tmp_path / "run", 3)
    on_gpu(run)
    change(run)
    out = tmp_path / "records"
    assert main(["submission", str(run), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    sub = json.loads((out / "submission.json").read_text())
    assert sub["track"] == "non_record_16mb" and len(sub["record_warnings"]) == 1 and words in sub["record_warnings"][0]
    assert words in err and "non_record_16mb" in err
    assert words in (out / "README.md").read_text()


def test_seeds_on_different_data_are_refused(reference_run, tmp_path, capsys):
    """The data is not part of the baked configuration: seeds on two datasets would be averaged
    into one meaningless score. The same folder at another path (another machine) is fine."""
    moved = copy_as_seed(reference_run, tmp_path / "moved", 4, summary_change=lambda s: s.update(data="/elsewhere/datasets/fineweb10B_sp1024"))
    write_records([reference_run, moved], tmp_path / "ok", info=SubmissionInfo())
    other = copy_as_seed(reference_run, tmp_path / "other", 5, summary_change=lambda s: s.update(data="/corpora/my_books"))
    refused([reference_run, other], tmp_path / "out", capsys, "runs used different data", "'/corpora/my_books'", str(other))


def test_script_runs_the_configured_evaluation_compute(official_layout, tmp_path):
    """A run with a loop count and test-time training at evaluation: its script runs the same
    evaluation and prints the submitted score; the records folder submits that score and says
    what the evaluation did."""
    data = official_layout / "data" / "datasets" / "fineweb10B_sp1024"
    ref = tmp_path / "ref"
    argv = ["run", "--preset", "debug", "--plan", "cycle:1x2", "--loops", "3", "--ttt", "rank=2,lr=0.01", "--eval-time", "100"]
    assert main([*argv, "--data", str(data), "--out", str(ref), "--seed", str(SEED), "--json"]) == 0
    summary = json.loads((ref / "summary.json").read_text())
    e = summary["eval_compute"]
    assert e["loops"] == 3 and e["ttt"].startswith("rank=2,lr=0.01") and e["tokens_adapted"] > 0
    assert e["val_bpb"] != summary["val_bpb_post"] and e["val_bpb_without_ttt"] != summary["val_bpb_post"]  # 3 loops, not the trained 2
    script = tmp_path / "train_gpt.py"
    script.write_text(render_script(RunDir(ref).read_config()), encoding="utf-8")
    proc = run_script(script, official_layout, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "out" / "summary.json").read_text())["eval_compute"]
    assert got["val_bpb"] == pytest.approx(e["val_bpb"], abs=1e-4)
    assert f"final_eval_compute_exact loops:3 ttt:{e['ttt']} val_loss:{got['val_loss']:.8f} val_bpb:{got['val_bpb']:.8f}" in proc.stdout
    folder = tmp_path / "records"
    sub = write_records([ref], folder, info=SubmissionInfo(author="a", github_id="b"))
    assert sub["val_bpb"] == e["val_bpb"] and sub["seed_results"][str(SEED)]["val_bpb_roundtrip"] == summary["val_bpb_post"]
    assert sub["evaluation"]["ttt"] == e["ttt"] and sub["evaluation"]["loops"] == 3
    assert "test-time training" in (folder / "README.md").read_text()


def test_code_form_is_what_a_run_counts_and_what_the_submission_writes(reference_run, official_layout, tmp_path):
    """`run --code-form minify+lzma` counts that form's bytes against the cap (same code id as the
    plain run: the form is packaging), says so in its summary, and `submission` writes that form
    unless told otherwise; an unknown form is refused."""
    from loopgolf.config import ExportConfig

    data = official_layout / "data" / "datasets" / "fineweb10B_sp1024"
    out = tmp_path / "packed"
    assert main(["run", "--preset", "debug", "--data", str(data), "--out", str(out), "--seed", str(SEED), "--code-form", "minify+lzma", "--json"]) == 0
    ref = json.loads((reference_run / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    config = RunDir(out).read_config()
    assert config.export.code_form == "minify+lzma" and got["code_form"] == "minify+lzma" and ref["code_form"] == "plain"
    assert got["code_bytes"] == len(Bundle.of(config).render("minify", "lzma").encode("utf-8")) < ref["code_bytes"] / 4
    assert got["code_id"] == ref["code_id"] and got["model_bytes"] == ref["model_bytes"]
    assert got["artifact_bytes"] == got["model_bytes"] + got["code_bytes"]
    sub = write_records([out], tmp_path / "records", info=SubmissionInfo())
    assert sub["bytes_code"] == got["code_bytes"] == (tmp_path / "records" / "train_gpt.py").stat().st_size
    plain = write_records([out], tmp_path / "records-plain", info=SubmissionInfo(), form="plain")
    assert plain["bytes_code"] == ref["code_bytes"]
    with pytest.raises(ValueError, match="unknown code form"):
        ExportConfig(code_form="zip")


def test_a_minified_code_form_without_the_minifier_fails_before_training(official_layout, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "python_minifier", None)  # importing it now raises ImportError
    data = official_layout / "data" / "datasets" / "fineweb10B_sp1024"
    out = tmp_path / "run"
    assert main(["run", "--preset", "debug", "--data", str(data), "--out", str(out), "--code-form", "minify"]) == 2
    err = capsys.readouterr().err
    assert "python-minifier" in err and "loopgolf[submit]" in err and "Traceback" not in err
    assert not (out / "log.jsonl").exists()  # nothing trained


def test_the_record_recipe_preset_makes_a_submission_that_reproduces_its_run(official_layout, tmp_path):
    """cpu-record (every record option: architecture, optimizer, EMA, int6 GPTQ export), shrunk
    to a few steps: its generated script trains, exports and scores the same numbers, and the
    records folder is written."""
    data = official_layout / "data" / "datasets" / "fineweb10B_sp1024"
    ref = tmp_path / "ref"
    shrink = [
        "--dim",
        "64",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--steps",
        "6",
        "--train",
        "time_budget=null",
        "--train",
        "seq_len=32",
        "--train",
        "batch_tokens=256",
    ]
    assert main(["run", "--preset", "cpu-record", *shrink, "--data", str(data), "--out", str(ref), "--seed", str(SEED), "--json"]) == 0
    config = RunDir(ref).read_config()
    assert config.model.xsa and config.model.smear_gate and config.train.ema_decay == 0.97 and config.export.quant == RECORD_POLICY
    script = tmp_path / "train_gpt.py"
    script.write_text(render_script(config), encoding="utf-8")
    proc = run_script(script, official_layout, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert_reproduces(ref, tmp_path / "out")
    sub = write_records([ref], tmp_path / "records", info=SubmissionInfo(author="a", github_id="b"))
    assert sub["seed_results"][str(SEED)]["val_bpb_roundtrip"] == json.loads((ref / "summary.json").read_text())["val_bpb_post"]
