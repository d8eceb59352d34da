"""The lm-evaluation-harness model "falcon-mamba": request types against direct computation, and a
run of local YAML tasks (hub data sets cannot be fetched) through simple_evaluate and the CLI."""

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'falcon-mamba[eval]')")

import falcon_mamba as fm  # noqa: E402
from falcon_mamba.cli import main  # noqa: E402
from tests.test_eval import tiny_folder  # noqa: E402

DOCS = [
    {"question": "Speak, speak. First", "choices": [" Citizen", " word", " ligne"], "answer": 0},
    {"question": "hear me", "choices": [" speak.", " proceed", " good", " naïve"], "answer": 0},
    {"question": "One word, good", "choices": [" citizens", " sky"], "answer": 1},
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from falcon_mamba.eval.harness import FalconMambaLM

    folder = tiny_folder(tmp_path_factory.mktemp("harness") / "tiny", seed=3)
    return FalconMambaLM(pretrained=str(folder), batch_size=3)


def _inst(request_type, args, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=args, idx=idx)


def _direct_loglik(lm, ctx: str, cont: str):
    ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
    full = torch.tensor([ctx_ids + cont_ids])
    logits, _ = lm.model(full)
    lp = F.log_softmax(logits[0, len(ctx_ids) - 1:-1], -1)
    target = torch.tensor(cont_ids)
    return lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


def test_loglikelihood_batched_equals_direct(lm):
    pairs = [(d["question"], c) for d in DOCS for c in d["choices"]]
    reqs = [_inst("loglikelihood", p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    lm.batch_size = 1
    one_by_one = lm.loglikelihood(reqs, disable_tqdm=True)
    lm.batch_size = 3
    for (ctx, cont), (lp, greedy), (lp1, _) in zip(pairs, got, one_by_one):
        want_lp, want_greedy = _direct_loglik(lm, ctx, cont)
        assert math.isclose(lp, want_lp, rel_tol=1e-4, abs_tol=1e-4), (ctx, cont, lp, want_lp)
        assert math.isclose(lp, lp1, rel_tol=1e-4, abs_tol=1e-4)  # padding never leaks into a row
        assert greedy == want_greedy
    # A continuation made of the model's own greedy tokens must be reported greedy.
    ids = lm.tok_encode("First Citizen")
    logits, _ = lm.model(torch.tensor([ids]))
    nxt = int(logits[0, -1].argmax())
    ((_, greedy),) = lm._loglikelihood_tokens([(None, ids, [nxt])], disable_tqdm=True)
    assert greedy


def test_loglikelihood_rolling_scores_every_token(lm):
    text = "Before we proceed any further, hear me speak."
    (got,) = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))], disable_tqdm=True)
    full = torch.tensor([[lm.prefix_token_id] + lm.tok_encode(text)])
    logits, _ = lm.model(full)
    want = -F.cross_entropy(logits[0, :-1], full[0, 1:], reduction="sum").item()
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)


def test_generate_until_matches_generate(lm):
    gen_kwargs = {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False}
    prompts = ["First Citizen:", "All: Speak,"]
    got = lm.generate_until([_inst("generate_until", (p, gen_kwargs), i) for i, p in enumerate(prompts)],
                            disable_tqdm=True)
    from falcon_mamba.generate import generate

    for p, g in zip(prompts, got):
        want = generate(lm.model, lm.tokenizer, p, max_new_tokens=6, temperature=0.0, stop=("\n", "."))
        assert g == want
        assert "\n" not in g and "." not in g
    chat = lm.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert chat == lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert "Hi there" in chat


def _write_tasks(root):
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    common = f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
    """
    (root / "fm_mc.yaml").write_text(textwrap.dedent(f"""
        task: fm_mc
        {textwrap.dedent(common).strip().replace(chr(10), chr(10) + '        ')}
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        target_delimiter: ""
        metric_list:
          - metric: acc
    """))
    (root / "fm_gen.yaml").write_text(textwrap.dedent(f"""
        task: fm_gen
        {textwrap.dedent(common).strip().replace(chr(10), chr(10) + '        ')}
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{choices[answer]}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 4
          do_sample: false
        metric_list:
          - metric: exact_match
    """))
    (root / "fm_ppl.yaml").write_text(textwrap.dedent(f"""
        task: fm_ppl
        {textwrap.dedent(common).strip().replace(chr(10), chr(10) + '        ')}
        output_type: loglikelihood_rolling
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{question}}}}"
        metric_list:
          - metric: word_perplexity
    """))


def test_simple_evaluate_on_local_tasks(lm, tmp_path):
    from lm_eval.tasks import TaskManager

    _write_tasks(tmp_path)
    out = lm_eval.simple_evaluate(model=lm, tasks=["fm_mc", "fm_gen", "fm_ppl"],
                                  task_manager=TaskManager(include_path=str(tmp_path),
                                                           include_defaults=False))
    res = out["results"]
    # Our own multiple-choice accuracy from direct log-likelihoods must be what the harness reports.
    correct = 0
    for d in DOCS:
        scores = [_direct_loglik(lm, d["question"], c)[0] for c in d["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    assert res["fm_mc"]["acc,none"] == pytest.approx(correct / len(DOCS))
    assert "exact_match,none" in res["fm_gen"] and res["fm_ppl"]["word_perplexity,none"] > 1


def test_harness_cli_finds_the_model_by_name(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    # Indexing the harness's thousands of built-in task files takes most of a minute; this test
    # is about finding the model, so the CLI's task manager sees only the local tasks.
    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **kw: init(
        self, *a, **{**kw, "include_defaults": False}))
    folder = tiny_folder(tmp_path / "m", seed=4)
    _write_tasks(tmp_path)
    rc = main(["eval", "harness", "--model", "falcon-mamba", "--model_args", f"pretrained={folder}",
               "--tasks", "fm_mc", "--include_path", str(tmp_path), "--batch_size", "2",
               "--output_path", str(tmp_path / "out")])
    assert rc == 0
    files = list((tmp_path / "out").rglob("results*.json"))
    assert files, "lm_eval wrote no results file"
    results = json.loads(files[0].read_text())
    assert results["config"]["model"] == "falcon-mamba" and "fm_mc" in results["results"]
    assert 0.0 <= results["results"]["fm_mc"]["acc,none"] <= 1.0
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("falcon-mamba").__name__ == "FalconMambaLM"
    assert "hf" in model_registry.keys()  # registering ours did not hide the harness's own models
    assert isinstance(fm.load_model(folder), fm.FalconMamba)
