"""The researcher's path (issue 27), end to end on the command line: train a tiny vanilla model,
convert it into a recursive one, score it right after conversion (the paper's first sanity check)
and at every other stage; early-exit criteria that cannot fire are refused wherever a criterion is
taken; the byte budget lists each candidate once."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from helpers import one_line_error, tiny_model

from loopgolf.cli import main
from loopgolf.model.plan import PlanSpec
from loopgolf.serve.exits import check_fires, parse_criterion

# Every projection of the debug preset's model (width 32, one KV head of 16) at its full rank:
# the conversion is then exact.
FULL_RANKS = "q=32,k=16,v=16,o=32,mlp_in=32,mlp_out=32"


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _eval(argv: list[str], capsys) -> dict:
    code, out, err = _main(["eval", *argv, "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r.pop("eval_seconds") > 0  # the one figure that differs between two evaluations
    return r


@pytest.fixture(scope="module")
def path(text_dataset, tmp_path_factory):
    """A train-only run R (debug preset, 3 steps), its strict (C) and full-rank (CF) conversions
    to cycle:1x2, and a finished run F: the directories a researcher has on the way."""
    root = tmp_path_factory.mktemp("researcher")
    data = str(text_dataset)
    paths = {name: root / name for name in ("R", "C", "CF", "F")}
    assert main(["train", "--preset", "debug", "--data", data, "--steps", "3", "--out", str(paths["R"]), "--quiet"]) == 0
    assert main(["convert", "--from", str(paths["R"]), "--plan", "cycle:1x2", "--out", str(paths["C"]), "--json"]) == 0
    assert main(["convert", "--from", str(paths["R"]), "--plan", "cycle:1x2", "--lora-ranks", FULL_RANKS, "--out", str(paths["CF"]), "--json"]) == 0
    assert main(["run", "--preset", "debug", "--data", data, "--steps", "3", "--out", str(paths["F"]), "--quiet", "--json"]) == 0
    return paths


# ---------------------------------------------------------------- item 1: eval takes any model


def test_a_converted_model_is_scored_right_after_conversion(path, text_dataset, capsys):
    r = _eval([str(path["C"]), "--data", str(text_dataset)], capsys)
    assert math.isfinite(r["val_bpb"]) and r["val_bpb"] > 0 and r["origin"] == "convert"
    # Scored like its source: the window the source trained at (the debug preset's 32), not 1024.
    assert r["seq_len"] == 32 and r["num_targets"] > 0
    # Without --data: the data the source run trained on.
    assert _eval([str(path["C"])], capsys) == {**r, "data": str(text_dataset)}


def test_a_full_rank_conversion_scores_what_its_source_scores(path, text_dataset, capsys):
    source = _eval([str(path["R"]), "--data", str(text_dataset)], capsys)
    full = _eval([str(path["CF"]), "--data", str(text_dataset)], capsys)
    strict = _eval([str(path["C"]), "--data", str(text_dataset)], capsys)
    assert full["val_bpb"] == pytest.approx(source["val_bpb"], rel=1e-6)
    assert (full["num_targets"], full["target_bytes"]) == (source["num_targets"], source["target_bytes"])
    assert strict["val_bpb"] != pytest.approx(source["val_bpb"], rel=1e-6)  # a strict tie loses something


def test_a_train_only_run_is_scored_from_its_checkpoint_on_its_recorded_data(path, text_dataset, tmp_path, capsys):
    r = _eval([str(path["R"])], capsys)  # no --data: the data it trained on
    assert r["origin"] == "checkpoint" and r["data"] == str(text_dataset) and r["seq_len"] == 32
    assert math.isfinite(r["val_bpb"])
    ckpt = _eval([str(path["R"] / "checkpoint.pt")], capsys)
    assert ckpt["val_bpb"] == r["val_bpb"] and ckpt["origin"] == "checkpoint"
    # A checkpoint outside its run (any name): its model and window travel inside it; data must be given.
    loose = tmp_path / "weights.bin"
    shutil.copy(path["R"] / "checkpoint.pt", loose)
    code, _, err = _main(["eval", str(loose), "--json"], capsys)
    one_line_error(code, err, "--data")
    assert _eval([str(loose), "--data", str(text_dataset)], capsys)["val_bpb"] == r["val_bpb"]


def test_a_finished_run_is_scored_from_its_artifact(path, capsys):
    from loopgolf.rundir import RunDir

    summary = RunDir(path["F"]).read_summary()
    r = _eval([str(path["F"])], capsys)
    assert r["origin"] == "artifact" and r["artifact"] == str(path["F"] / "artifact.lgz")
    assert r["val_bpb"] == pytest.approx(summary.val_bpb_post, rel=1e-9)
    assert _eval([str(path["F"] / "artifact.lgz")], capsys)["val_bpb"] == r["val_bpb"]


def test_a_converted_model_whose_source_is_gone_needs_data(path, text_dataset, tmp_path, capsys):
    source = tmp_path / "R"
    shutil.copytree(path["R"], source)
    assert main(["convert", "--from", str(source), "--plan", "cycle:1x2", "--out", str(tmp_path / "C"), "--json"]) == 0
    shutil.rmtree(source)
    code, _, err = _main(["eval", str(tmp_path / "C")], capsys)
    one_line_error(code, err, "--data")
    assert math.isfinite(_eval([str(tmp_path / "C"), "--data", str(text_dataset), "--max-tokens", "2048"], capsys)["val_bpb"])


def _bad_models(root, good_run):
    (root / "empty").mkdir()
    corrupt = root / "corrupt"
    corrupt.mkdir()
    shutil.copy(good_run / "config.json", corrupt / "config.json")
    (corrupt / "checkpoint.pt").write_bytes((good_run / "checkpoint.pt").read_bytes()[:400])
    (root / "notes.txt").write_text("not a model\n")
    (root / "flipped.pt").write_bytes(b"LGCKPT\r\n" + b"\0" * 100)
    return {
        "missing": (root / "missing", "no model at"),
        "empty dir": (root / "empty", "holds neither"),
        "dir with a corrupted checkpoint": (corrupt, "corrupted"),
        "corrupted checkpoint file": (corrupt / "checkpoint.pt", "corrupted"),
        "damaged header": (root / "flipped.pt", "checkpoint"),
        "text file": (root / "notes.txt", "neither a loopgolf artifact nor a checkpoint"),
    }


@pytest.mark.parametrize("case", ["missing", "empty dir", "dir with a corrupted checkpoint", "corrupted checkpoint file", "damaged header", "text file"])
def test_bad_model_paths_give_one_line_and_exit_2(case, path, text_dataset, tmp_path, capsys):
    model, message = _bad_models(tmp_path, path["R"])[case]
    code, _, err = _main(["eval", str(model), "--data", str(text_dataset), "--json"], capsys)
    one_line_error(code, err, message)
    assert "resume" not in err  # the checkpoint reader's resume wording does not leak into eval


def test_run_with_zero_steps_is_refused_and_points_to_eval(text_dataset, tmp_path, capsys):
    for command in ("run", "train"):
        with pytest.raises(SystemExit) as e:
            main([command, "--preset", "debug", "--data", str(text_dataset), "--steps", "0", "--out", str(tmp_path / command), "--quiet"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--steps" in err and "loopgolf eval MODEL" in err and "Traceback" not in err
        assert not (tmp_path / command).exists()


# ---------------------------------------------------------------- item 2: criteria that cannot fire


def _passes(n: int):
    return tiny_model(plan=PlanSpec("cycle", layers=1, loops=n)) if n > 1 else tiny_model(plan=PlanSpec("vanilla", layers=2))


def test_check_fires_refuses_what_can_never_stop_a_token():
    two, three = _passes(2), _passes(3)
    for text in ("never", "maxprob:0.5", "after:1"):
        check_fires(parse_criterion(text), two)
    for text in ("agree", "after:2", "after:1", "maxprob:0.9"):
        check_fires(parse_criterion(text), three)
    with pytest.raises(ValueError, match="agree.*never fire"):
        check_fires(parse_criterion("agree"), two)
    for text, model in (("after:2", two), ("after:3", three), ("after:7", three)):
        with pytest.raises(ValueError, match="never stop one early"):
            check_fires(parse_criterion(text), model)
    with pytest.raises(ValueError, match="single pass"):
        check_fires(parse_criterion("maxprob:0.5"), _passes(1))
    check_fires(parse_criterion("never"), _passes(1))  # full depth is always a valid reference


def test_bench_serve_defaults_to_a_criterion_that_fires():
    from loopgolf.bench.serve import default_criterion

    assert str(default_criterion(_passes(2))) == "maxprob:0.5"
    assert str(default_criterion(_passes(3))) == "agree"
    assert str(default_criterion(_passes(4))) == "agree"
    for n in (2, 3, 4):
        check_fires(default_criterion(_passes(n)), _passes(n))


@pytest.mark.parametrize("criterion,message", [("agree", "never fire"), ("after:2", "never stop one early")])
def test_every_entry_point_refuses_a_criterion_that_cannot_fire(criterion, message, path, text_dataset, capsys, monkeypatch):
    import loopgolf.serve.server

    def no_serving(*a, **k):
        raise AssertionError("the server started with a criterion that cannot fire")

    monkeypatch.setattr(loopgolf.serve.server, "serve", no_serving)
    model = str(path["C"])  # cycle:1x2: two passes, one exit point
    data = ["--data", str(text_dataset)]
    for argv in (
        ["eval", model, *data, "--early-exit", criterion, "--max-tokens", "256", "--json"],
        ["generate", model, "--prompt", "the model", "--max-new-tokens", "2", "--early-exit", criterion, "--json"],
        ["serve", model, "--port", "1", "--early-exit", criterion],
        ["bench", "serve", model, *data, "--early-exit", criterion, "--requests", "2", "--server-requests", "0", "--repeats", "1", "--json"],
    ):
        code, _, err = _main(argv, capsys)
        one_line_error(code, err, message)
    # What can fire on two passes is accepted (eval as the witness).
    r = _eval([model, *data, "--early-exit", "after:1", "--max-tokens", "256"], capsys)
    assert r["mean_loops"] == 1.0 and r["origin"] == "convert"


# ---------------------------------------------------------------- item 4: the byte budget lists each row once


def test_budget_lists_each_candidate_once():
    from loopgolf.budget import budget_report
    from loopgolf.export.quantize import parse_policy

    common = dict(preset="cpu-shared", policy=parse_policy("int6"), codec="lzma", weights="trained", code_bytes=50_000, overrides={}, matmul_flops=2e10)
    # --layers/--loops lists that land on the preset's own plan (cycle:2x3) more than once, and a
    # family that names the preset twice: each configuration is one row.
    for family, layers, loops in ((None, [2, 2, 3], [3, 3, 2]), ("cpu-shared,cpu-shared", [2], [3]), ("cpu-shared,cpu-shared", None, None)):
        out = budget_report(2_500_000, family=family, layers=layers, loops=loops, **common)
        rows = [json.dumps(c, sort_keys=True) for c in out["candidates"]]
        assert rows and len(rows) == len(set(rows)), family
        keys = [(c["preset"], c["plan"], c["model_dim"]) for c in out["candidates"]]
        assert len(keys) == len(set(keys))


def test_eval_of_a_run_scored_with_a_stride_uses_that_stride(text_dataset, tmp_path, capsys):
    """`eval RUN` with no --stride scores as the run did, so it reproduces val_bpb_post."""
    run = tmp_path / "strided"
    code, out, _ = _main(["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(run), "--steps", "2", "--stride", "16", "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["eval_stride"] == 16
    got = _eval([str(run)], capsys)
    assert got["stride"] == 16 and got["val_bpb"] == pytest.approx(summary["val_bpb_post"], rel=1e-9)
    assert _eval([str(run), "--stride", "32"], capsys)["stride"] == 32  # an explicit stride still wins
