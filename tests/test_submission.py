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
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["code_bytes"] == script.stat().st_size


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
