"""Compute spent at evaluation: running the loop more (or fewer) times than training did, and
score-first test-time training (loopgolf.ttt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TINY, markov_tokens, one_line_error, random_byte_tables, random_model, tiny_model

from loopgolf.evaluate import evaluate_bpb
from loopgolf.model.plan import PlanSpec, build_plan, parse_plan
from loopgolf.ttt import TTTSpec, documents, evaluate_ttt

LOOPED = ["cycle:2x3", "sequence:2x2", "cycle-rev:2x3", "middle-cycle:1+2x2+1", "middle-sequence:1+1x3+1", "mini-loop:4:1-2x2", "cycle:2x2@mlp"]
VOCAB = TINY["vocab_size"]


# ---------------------------------------------------------------- loop schedules


def test_extra_loops_repeat_the_last_trained_pass():
    plan = build_plan(parse_plan("cycle:2x3"))
    assert plan.schedule(4) == ((0, 1, 2, 3, 4, 5, 4, 5), (0, 0, 1, 1, 2, 2, 3, 3))
    assert plan.schedule(1) == ((0, 1), (0, 0))
    mini = build_plan(parse_plan("mini-loop:4:1-2x1"))  # 0,1,2 | 1,2 | 3 as virtual layers 0..5
    assert mini.schedule(3) == ((0, 1, 2, 3, 4, 3, 4, 5), (0, 0, 0, 1, 1, 2, 2, 0))
    assert mini.schedule(1) == ((0, 1, 2, 5), (0, 0, 0, 0))


@pytest.mark.parametrize("text", LOOPED)
def test_fewer_loops_are_the_progressive_stages_and_the_trained_count_is_the_plan(text):
    plan = build_plan(parse_plan(text))
    for n in range(1, plan.num_loops + 1):
        layers, passes = plan.schedule(n)
        assert layers == plan.active_layers(n - 1)
        assert max(passes) == n - 1
    layers, passes = plan.schedule(plan.num_loops + 2)
    assert max(passes) == plan.num_loops + 1 and set(layers) == set(range(plan.num_virtual))


@pytest.mark.parametrize("text", ["vanilla:3", "explicit:0,1,0,1"])
def test_a_plan_without_loops_refuses_a_loop_count(text):
    model = tiny_model(plan=text)
    with pytest.raises(ValueError, match="has no loop to run more or fewer times"):
        model.set_loops(2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, 10**9])
def test_a_bad_loop_count_is_refused(bad):
    model = tiny_model(plan="cycle:2x2")
    with pytest.raises(ValueError, match="loop"):
        model.set_loops(bad)
    assert model.loops is None


@pytest.mark.parametrize("text", LOOPED)
def test_the_trained_loop_count_is_plain_evaluation_bit_for_bit(text):
    model = random_model(parse_plan(text), seed=3, per_layer_controls=True, depth_embeddings=True, lora_ranks={"q": 2, "mlp_out": 2})
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
        model.set_loops(model.plan.num_loops)
        same = model(x)
        model.set_loops(1)
        model_1 = model(x)
        model.set_loops(None)
        model.set_stage(0)
        stage_0 = model(x)
        model.set_stage(None)
    assert torch.equal(plain, same)
    assert torch.equal(model_1, stage_0)


def test_stages_and_loop_counts_do_not_mix():
    model = tiny_model(plan="cycle:2x3")
    model.set_stage(0)
    with pytest.raises(ValueError, match="progressive-recurrence stage"):
        model.set_loops(4)
    model.set_stage(None)
    model.set_loops(4)
    with pytest.raises(ValueError, match="changed loop count"):
        model.set_stage(1)


@pytest.mark.parametrize("text", ["cycle:2x2", "middle-cycle:1+2x2+1", "mini-loop:4:1-2x1", "sequence:2x2"])
def test_extra_loops_through_the_kv_cache_equal_the_full_forward(text):
    """Cached, token by token, at 3 loops of a 2-loop model (or 2 extra of a mini-loop): the
    cache keeps a layer run twice apart, and U-Net skips follow the full forward."""
    from loopgolf.serve.runner import LayerRunner, Token

    model = random_model(parse_plan(text), seed=5, per_layer_controls=True, lora_ranks={"v": 2})
    model.set_loops(model.plan.num_loops + 1)
    ids = [int(i) for i in torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0]
        runner = LayerRunner(model, 1, 32)
        tokens = [Token(0, p, t) for p, t in enumerate(ids)]
        runner.run(tokens)
    assert all(t.loops == model.plan.num_loops + 1 for t in tokens)
    torch.testing.assert_close(torch.stack([t.logits for t in tokens]), full, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- test-time training


def _stream(n: int = 16 * 24 + 1, seed: int = 0) -> np.ndarray:
    return markov_tokens(n, VOCAB, seed=seed)


def _model(plan: str = "cycle:2x2", seed: int = 2):
    model = random_model(parse_plan(plan), seed=seed)
    with torch.no_grad():  # smaller weights than random_model's: a model whose loss an adapter can move
        for p in model.parameters():
            p.mul_(0.3)
    return model


@pytest.mark.parametrize("stride", [16, 8])
def test_ttt_at_learning_rate_zero_is_plain_evaluation_bit_for_bit(stride):
    model, tokens, tables = _model(), _stream(), random_byte_tables(VOCAB)
    plain = evaluate_bpb(model, tokens, tables, 16, stride=stride, batch_size=3)
    r = evaluate_ttt(model, tokens, tables, 16, TTTSpec(rank=4, lr=0.0, steps=2), stride=stride, batch_size=3)
    assert r.adapted == plain and r.base == plain
    assert r.updates > 0 and r.tokens_adapted > 0  # the update ran; it moved nothing


def test_ttt_leaves_the_model_as_it_found_it():
    model, tokens, tables = _model(), _stream(), random_byte_tables(VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_ttt(model, tokens, tables, 16, TTTSpec(rank=4, lr=0.05), batch_size=4)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters()) and model.__dict__.get("attached_lora") is None


@pytest.mark.parametrize("reset", ["none", "doc"])
def test_ttt_scores_every_token_before_it_trains_on_it(reset):
    """Changing the tokens after position t leaves every score up to t unchanged, bit for bit."""
    model, tables = _model(), random_byte_tables(VOCAB)
    tokens = _stream(16 * 30 + 1)
    t = 200
    other = tokens.copy()
    other[t + 1 :] = _stream(len(tokens), seed=9)[t + 1 :]
    spec = TTTSpec(rank=4, lr=0.05, reset=reset, chunk=8, steps=2)
    a = evaluate_ttt(model, tokens, tables, 16, spec, batch_size=2, keep_scores=True)
    b = evaluate_ttt(model, other, tables, 16, spec, batch_size=2, keep_scores=True)
    pos_a, nll_a = (np.concatenate(v) for v in zip(*a.scores))
    pos_b, nll_b = (np.concatenate(v) for v in zip(*b.scores))
    assert np.array_equal(pos_a, pos_b) and len(np.unique(pos_a)) == len(pos_a)  # one pass: each target once
    early = pos_a <= t
    assert early.sum() >= t - 16 and np.array_equal(nll_a[early], nll_b[early])
    assert not np.array_equal(nll_a[~early], nll_b[~early])  # the later tokens did change something
    assert a.updates > 0


@pytest.mark.parametrize("reset", ["none", "doc"])
def test_every_ttt_score_is_a_full_normalized_distribution(reset):
    """exp(-loss) summed over every token the target could have been is 1, for a position scored
    after the adapters have moved."""
    model, tables = _model(), random_byte_tables(VOCAB)
    tokens = _stream(16 * 6 + 1)
    p = 16 * 4 + 5
    spec = TTTSpec(rank=2, lr=0.05, reset=reset, chunk=4)
    probs = []
    for v in range(VOCAB):
        tokens[p] = v
        r = evaluate_ttt(model, tokens, tables, 16, spec, batch_size=1, keep_scores=True, baseline=False)
        pos, nll = (np.concatenate(x) for x in zip(*r.scores))
        probs.append(float(np.exp(-nll[pos == p][0])))
        assert r.updates > 0
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_ttt_learns_a_repeated_passage():
    """Text that repeats: the adapters learn it, so the score with TTT is better than without
    (which is the same evaluation with the adaptation removed)."""
    model, tables = _model(seed=7), random_byte_tables(VOCAB)
    passage = np.random.default_rng(3).integers(4, VOCAB, size=48)
    tokens = np.concatenate([[1]] + [passage] * 12).astype(np.uint16)
    r = evaluate_ttt(model, tokens, tables, 16, TTTSpec(rank=8, lr=0.02, steps=2), batch_size=2)
    assert r.base is not None and r.gain > 0.2, (r.base.val_bpb, r.adapted.val_bpb)
    zero = evaluate_ttt(model, tokens, tables, 16, TTTSpec(rank=8, lr=0.0, steps=2), batch_size=2)
    assert zero.gain == 0.0


def test_ttt_per_document_resets_and_its_baseline_is_the_same_windows():
    model, tables = _model(), random_byte_tables(VOCAB)
    tokens = _stream(16 * 40 + 1)
    docs = documents(tokens)
    assert docs[0][0] == 0 and all(tokens[s] == 1 for s, _ in docs) and docs[-1][1] == len(tokens) - 1
    assert all(e == s2 for (_, e), (s2, _) in zip(docs, docs[1:]))  # a document's last target is the next BOS
    zero = evaluate_ttt(model, tokens, tables, 16, TTTSpec(rank=4, lr=0.0, reset="doc", chunk=8), batch_size=1)
    assert zero.adapted == zero.base and zero.adapted.num_targets == len(tokens) - 1
    moved = evaluate_ttt(model, tokens, tables, 16, TTTSpec(rank=4, lr=0.05, reset="doc", chunk=8), batch_size=1)
    assert moved.base == zero.base and moved.adapted != zero.adapted


def test_eval_time_stops_adapting_but_keeps_scoring():
    model, tables = _model(), random_byte_tables(VOCAB)
    tokens = _stream()
    full = evaluate_ttt(model, tokens, tables, 16, TTTSpec(rank=4, lr=0.05), batch_size=2)
    cut = evaluate_ttt(model, tokens, tables, 16, TTTSpec(rank=4, lr=0.05), batch_size=2, eval_time=1e-9)
    assert full.adapting_stopped_at is None and cut.adapting_stopped_at is not None
    assert cut.updates == 0 and cut.adapted == cut.base and cut.adapted.num_targets == full.adapted.num_targets


def test_an_update_on_an_unscored_token_is_refused():
    from loopgolf.ttt import Adaptation

    model = _model()
    ttt = Adaptation(model, TTTSpec(rank=2), torch.device("cpu"))
    ttt.scored(10)
    x = np.zeros((1, 12), dtype=np.int64)
    with pytest.raises(AssertionError, match="score-first"):
        ttt.update(x, x, np.ones(x.shape, dtype=bool), 11)


def test_ttt_on_more_loops_adapts_each_virtual_layer():
    model, tables = _model("cycle:2x2"), random_byte_tables(VOCAB)
    model.set_loops(3)
    r = evaluate_ttt(model, _stream(), tables, 16, TTTSpec(rank=2, lr=0.05), batch_size=4)
    model.set_loops(None)
    assert r.gain is not None and r.updates > 0


@pytest.mark.parametrize(
    "text,match",
    [
        ("rank=0", "rank must be"),
        ("rank=8,lr=nan", "lr must be"),
        ("lr=-1", "lr must be"),
        ("reset=sometimes", "reset must be"),
        ("rank", "cannot parse"),
        ("depth=3", "cannot parse"),
        ("rank=2,rank=3", "twice"),
        ("rank=two", "not a number"),
        ("steps=100000", "steps must be"),
        ("targets=", "cannot parse"),
    ],
)
def test_bad_ttt_specs_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        TTTSpec.parse(text)


def test_ttt_spec_round_trips_and_checks_targets():
    spec = TTTSpec.parse("rank=4,lr=0.01,targets=q+v,reset=doc,chunk=16")
    assert TTTSpec.parse(str(spec)) == spec == TTTSpec.from_dict(spec.to_dict())
    with pytest.raises(ValueError, match="not a projection"):
        TTTSpec.parse("targets=mlp_gate").targets_for(_model())
    assert TTTSpec.parse("targets=all").targets_for(_model()) == _model().config.projections
    with pytest.raises(ValueError, match="longer than the evaluation window"):
        evaluate_ttt(_model(), _stream(), random_byte_tables(VOCAB), 16, TTTSpec(reset="doc", chunk=32))


# ---------------------------------------------------------------- the command line


def test_eval_loops_and_ttt_on_the_command_line(tiny_artifact, text_dataset, capsys):
    import json

    from loopgolf.cli import main

    path, _ = tiny_artifact
    base = [str(path), "--data", str(text_dataset), "--seq-len", "32", "--max-tokens", "600"]
    assert main(["eval", *base, "--loops", "1,2,3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["loops"] for r in rows] == [1, 2, 3]
    assert main(["eval", *base, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert rows[1]["val_bpb"] == plain["val_bpb"]
    assert main(["eval", *base, "--ttt", "rank=2,lr=0.01"]) == 0
    assert "with TTT" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--loops", "0"], "positive integers"),
        (["--loops", "2,2"], "repeated"),
        (["--eval-time", "5"], "needs --ttt"),
        (["--ttt", "rank=-1"], "rank must be"),
        (["--ttt", "rank=2", "--early-exit", "never"], "cannot be combined"),
        (["--eval-time", "nan", "--ttt", "rank=2"], "positive, finite"),
    ],
)
def test_bad_eval_compute_flags_are_one_line_errors(tiny_artifact, text_dataset, capsys, extra, match):
    from loopgolf.cli import main

    path, _ = tiny_artifact
    capsys.readouterr()
    try:
        code = main(["eval", str(path), "--data", str(text_dataset), *extra])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    one_line_error(code, capsys.readouterr().err, match)


def test_a_vanilla_model_refuses_loops_on_the_command_line(text_dataset, tmp_path, capsys):
    from loopgolf.export.pack import export_model

    path = tmp_path / "vanilla.ptz"
    export_model(random_model(PlanSpec("vanilla", layers=2), vocab_size=384, max_seq_len=64), path, bits=8)
    from loopgolf.cli import main

    capsys.readouterr()
    code = main(["eval", str(path), "--data", str(text_dataset), "--loops", "2"])
    one_line_error(code, capsys.readouterr().err, "vanilla plan has no loop")


# ---------------------------------------------------------------- depth-sampled training and the run contract


def test_depth_sampled_training_draws_a_loop_count_per_step(text_dataset, tmp_path):
    from loopgolf.cli import main
    from loopgolf.config import LoopSampler
    from loopgolf.util import read_jsonl

    out = tmp_path / "run"
    argv = ["run", "--preset", "debug", "--plan", "cycle:1x2", "--loop-sampling", "uniform:1-3", "--steps", "12", "--train", "log_every=1"]
    assert main([*argv, "--data", str(text_dataset), "--out", str(out), "--seed", "5", "--json"]) == 0
    records = [r for r in read_jsonl(out / "log.jsonl") if r.get("event") == "train"]
    sampler = LoopSampler.parse("uniform:1-3")
    assert [r["loops"] for r in records] == [sampler.draw(5, r["step"] - 1) for r in records]
    assert {r["loops"] for r in records} == {1, 2, 3}
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["loop_sampling"] == "uniform:1-3"


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--plan", "vanilla:2", "--loop-sampling", "uniform:1-2"], "has no loop"),
        (["--plan", "cycle:1x2", "--loop-sampling", "uniform:1-2", "--train", "recurrence_stages=[0.5]"], "cannot be combined with recurrence_stages"),
        (["--loop-sampling", "poisson:nan"], "cannot parse loop_sampling"),
        (["--eval-time", "5"], "set eval ttt too"),
        (["--ttt", "rank=2,reset=doc", "--stride", "8"], "takes no stride"),
        (["--plan", "vanilla:2", "--loops", "2"], "has no loop"),
    ],
)
def test_bad_depth_and_eval_compute_settings_fail_before_training(text_dataset, tmp_path, capsys, extra, match):
    from loopgolf.cli import main

    capsys.readouterr()
    code = main(["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(tmp_path / "run"), "--steps", "2", *extra])
    one_line_error(code, capsys.readouterr().err, match)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_run_configs_written_before_eval_compute_still_read():
    from loopgolf.config import RunConfig, get_preset

    config = RunConfig.from_preset(get_preset("debug"))
    d = config.to_dict()
    for part, name in (("eval", "loops"), ("eval", "ttt"), ("eval", "eval_time"), ("train", "loop_sampling")):
        del d[part][name]
    assert RunConfig.from_dict(d) == config
    d["eval"]["ttt"] = "rank=3"
    assert RunConfig.from_dict(d).eval.ttt == str(TTTSpec(rank=3))


def test_the_commands_help_gives_the_ttt_syntax():
    from loopgolf.commands.args import TTT_HELP
    from loopgolf.ttt import TTT_SYNTAX

    assert TTT_SYNTAX.split(" (e.g.")[0] in TTT_HELP


def test_generate_runs_more_loops_and_a_vanilla_model_refuses(tiny_artifact, tmp_path, capsys):
    from loopgolf.cli import main
    from loopgolf.export.pack import export_model

    path, tokenizer = tiny_artifact
    argv = ["generate", str(path), "--tokenizer", str(tokenizer), "--prompt", "the model", "--max-new-tokens", "3", "--temperature", "0", "--json"]
    capsys.readouterr()
    assert main([*argv, "--loops", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["loops"] == [3, 3, 3]
    vanilla = tmp_path / "vanilla.ptz"
    export_model(random_model(PlanSpec("vanilla", layers=2), vocab_size=384, max_seq_len=64), vanilla, bits=8)
    code = main(["generate", str(vanilla), *argv[2:], "--loops", "2"])
    one_line_error(code, capsys.readouterr().err, "vanilla plan has no loop")
