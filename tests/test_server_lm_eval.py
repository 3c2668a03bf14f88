"""lm-evaluation-harness scores a loglikelihood task through `loopgolf serve`: its
``local-completions`` model (remote tokenizer from /tokenizer_info and /tokenize, token-id prompts,
``echo`` + ``logprobs``) on a multiple-choice task defined by a local YAML file over a jsonl the
test writes (no download, offline), against a server started here. Every loglikelihood it reports
equals the one loopgolf computes with a plain forward pass over the same tokens, and so does the
accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import running_server

DOCS = [
    ("the model stores a few unique blocks and runs them", ["many times", "under the cap", "data flows"], 0),
    ("each loop adds depth without adding", ["bytes", "training", "width precision"], 0),
    ("data flows through attention and", ["mlp sublayers", "the saved budget", "a few"], 0),
    ("residual mixes scales and gains that keep", ["training stable", "adapters for", "the model"], 0),
    ("compressed into an artifact under", ["the cap", "many loops", "every layer"], 0),
    ("so the saved budget can buy width", ["precision or adapters", "the model", "stores"], 0),
]

SCRIPT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

base_url, include, out = sys.argv[1:4]
results = lm_eval.simple_evaluate(
    model="local-completions",
    model_args={"base_url": base_url, "model": "tiny", "tokenizer_backend": "remote", "tokenized_requests": True,
                "max_length": 96, "num_concurrent": 1, "max_retries": 1, "timeout": 60},
    tasks=["loopgolf_tiny_choice"],
    task_manager=TaskManager(include_path=include),
    log_samples=True,
    random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
)
samples = [{"doc": s["doc"], "arguments": [list(a) for a in s["arguments"]], "resps": s["resps"]} for s in results["samples"]["loopgolf_tiny_choice"]]
json.dump({"results": results["results"], "samples": samples}, open(out, "w"), default=str)
"""


def write_task(folder: Path, docs: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "choice.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in docs))
    (folder / "loopgolf_tiny_choice.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: loopgolf_tiny_choice
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{context}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: "{{{{label}}}}"
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            metadata:
              version: 1.0
            """
        )
    )
    return folder


@torch.no_grad()
def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """What lm-eval asks for, computed by loopgolf without the server: the tokens of context and
    continuation as lm-eval splits them (context alone, then the rest of the whole), one forward
    pass, the continuation's summed log-probabilities and whether each token is the argmax."""
    ctx = list(tokenizer.encode(context))
    whole = list(tokenizer.encode(context + continuation))
    ids = ctx + whole[len(ctx) :]
    logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    cont = range(len(ctx), len(ids))
    total = sum(float(logp[i - 1, ids[i]]) for i in cont)
    greedy = all(int(logp[i - 1].argmax()) == ids[i] for i in cont)
    return total, greedy


def test_lm_eval_local_completions_loglikelihoods_equal_loopgolf(tiny_artifact, tmp_path):
    from loopgolf.sources.open import open_for_text

    artifact, tok = tiny_artifact
    served = open_for_text(artifact, tok)
    docs = DOCS
    task_dir = write_task(tmp_path / "tasks", docs)
    out = tmp_path / "results.json"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    with running_server(artifact, tok) as (url, _, engine):
        r = subprocess.run(
            [sys.executable, "-c", SCRIPT, url + "/v1/completions", str(task_dir), str(out)], capture_output=True, text=True, env=env, timeout=600
        )
        assert r.returncode == 0, r.stderr[-4000:]
        assert engine.idle
    got = json.loads(out.read_text())
    samples = got["samples"]
    assert len(samples) == len(docs)
    model = served.model.eval()
    correct = 0
    for s in samples:
        doc = s["doc"]
        lls = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ll, greedy = resp[0]
            want, want_greedy = direct_loglikelihood(model, served.tokenizer, context, continuation)
            assert ll == pytest.approx(want, abs=1e-3), (context, continuation)
            assert bool(greedy) == want_greedy, (context, continuation)
            lls.append(want)
        correct += int(max(range(len(lls)), key=lls.__getitem__) == int(doc["label"]))
    acc = got["results"]["loopgolf_tiny_choice"]["acc,none"]
    assert acc == pytest.approx(correct / len(docs))
