"""The project's lm-eval model class gives the same numbers as lm-eval's own HFLM on the same dense model.

Both wrap the *same* in-memory model and tokenizer instance and get the same
``batch_size`` and ``max_length``; every request is compared one by one to
1e-4 absolute (log-likelihoods, rolling log-likelihoods), exactly (is_greedy
flags, generated text).

Also here: the EvalResult / metric-extraction helpers of ``evaluators.harness``
and a ``run_tasks`` smoke run on a tiny local task.
"""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
import torch

from lm_eval.api.instance import Instance

TOL = 1e-4
MAX_DIFF: dict[str, float] = {}  # request type -> largest |TorchLM - HFLM| seen (printed at the end with -s)


def _note(kind: str, diffs: list[float]) -> float:
    worst = max(diffs) if diffs else 0.0
    MAX_DIFF[kind] = max(MAX_DIFF.get(kind, 0.0), worst)
    print(f"[lm-equivalence] {kind}: {len(diffs)} requests, max |diff| = {worst:.3g}")
    return worst


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """The embedded default model (SmolLM2-135M), dense, float32, on the CPU.

    One torch thread: these forwards are short, and with 2 threads on a busy
    2-core machine OpenMP's spin-waiting made them ~8x slower (measured).
    """
    from evaluators.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    yield model, tokenizer
    torch.set_num_threads(threads)


def _pair(model_and_tokenizer, batch_size: int = 4, max_length: int | None = None):
    """(HFLM, TorchLM) over the same model instance with the same settings."""
    from lm_eval.models.huggingface import HFLM

    from evaluators.lm import TorchLM

    model, tokenizer = model_and_tokenizer
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # HFLM warns about pre-initialised models
    ref = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device="cpu")
    ours = TorchLM(model, tokenizer, batch_size=batch_size, max_length=max_length, device="cpu", disable_tqdm=True)
    return ref, ours


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LL_PAIRS = [
    ("The capital of France is", " Paris"),
    ("", "Hello world, this is a test."),  # empty context -> prefix token
    ("", "<|im_start|>user\nHi"),  # empty context, continuation starting with the prefix token itself
    ("To be, or not to be, ", "that is the question"),  # trailing spaces move into the continuation
    ("Once upon a time", " there was a little girl who lived in a village near the forest."),
    ("2 + 2 =", " 4"),  # three choices sharing one context (logits cache)
    ("2 + 2 =", " 5"),
    ("2 + 2 =", " four"),
    ("<|im_start|>user\nWhat is the capital of France?", " Paris"),  # context starting with BOS text
    ("First line\n", "Second line"),
    ("Caf", "é au lait, naïve façade"),  # continuation splitting a word
    ("The quick brown fox " * 30, "jumps over the lazy dog"),  # 120 context tokens: truncated at max_length 64
]


@pytest.mark.parametrize("max_length", [None, 64])
def test_loglikelihood_matches_hflm(model_and_tokenizer, max_length):
    ref, ours = _pair(model_and_tokenizer, batch_size=4, max_length=max_length)
    assert ours.max_length == ref.max_length
    assert ours.prefix_token_id == ref.prefix_token_id
    assert ours.eot_token_id == ref.eot_token_id
    for ctx, cont in LL_PAIRS:
        assert ours.tok_encode(ctx) == ref.tok_encode(ctx)
        assert ours.tok_encode(cont, add_special_tokens=False) == ref.tok_encode(cont, add_special_tokens=False)

    reqs = _requests("loglikelihood", LL_PAIRS)
    expected = ref.loglikelihood(reqs, disable_tqdm=True)
    got = ours.loglikelihood(reqs)
    assert len(got) == len(expected) == len(LL_PAIRS)
    diffs = []
    for (ctx, cont), (lp_ref, greedy_ref), (lp, greedy) in zip(LL_PAIRS, expected, got):
        assert math.isfinite(lp), (ctx, cont)
        diffs.append(abs(lp - lp_ref))
        assert abs(lp - lp_ref) <= TOL, f"{ctx[:30]!r} + {cont!r}: {lp} vs HFLM {lp_ref}"
        assert greedy == greedy_ref, f"{ctx[:30]!r} + {cont!r}: is_greedy {greedy} vs HFLM {greedy_ref}"
    _note(f"loglikelihood (max_length={ref.max_length})", diffs)
    assert any(g for _, g in got), "no request exercised is_greedy=True"
    assert ours.tokens_scored > 0 and ours.forward_calls > 0


def test_loglikelihood_shared_prefix_split_differently(model_and_tokenizer):
    """Requests whose context+continuation[:-1] coincide but split differently are each scored correctly.

    (HFLM's logits cache reads the shorter continuation's log-probs from the
    first positions of the shared row; TorchLM reads the trailing ones. The
    reference here is HFLM scoring each request on its own.)
    """
    ref, ours = _pair(model_and_tokenizer, batch_size=4)
    pairs = [("The cat sat on the", " mat"), ("The cat sat on", " the rug")]
    alone = [ref.loglikelihood(_requests("loglikelihood", [p]), disable_tqdm=True)[0] for p in pairs]
    got = ours.loglikelihood(_requests("loglikelihood", pairs))
    diffs = [abs(a[0] - b[0]) for a, b in zip(alone, got)]
    _note("loglikelihood (shared prefix)", diffs)
    assert max(diffs) <= TOL
    assert [a[1] for a in alone] == [b[1] for b in got]


ROLLING_TEXTS = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * k for k in (1, 3, 8)
] + ["Hi", "\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n"]


@pytest.mark.parametrize("batch_size", [4, 3])
def test_loglikelihood_rolling_matches_hflm(model_and_tokenizer, batch_size):
    ref, ours = _pair(model_and_tokenizer, batch_size=batch_size, max_length=64)
    assert max(len(ours.tok_encode(t)) for t in ROLLING_TEXTS) > 2 * 64  # three or more windows
    reqs = _requests("loglikelihood_rolling", [(t,) for t in ROLLING_TEXTS])
    expected = ref.loglikelihood_rolling(reqs, disable_tqdm=True)
    got = ours.loglikelihood_rolling(reqs)
    diffs = [abs(a - b) for a, b in zip(expected, got)]
    _note(f"loglikelihood_rolling (batch {batch_size})", diffs)
    for text, a, b in zip(ROLLING_TEXTS, expected, got):
        assert abs(a - b) <= TOL, f"{text[:30]!r}: {b} vs HFLM {a}"


def test_generate_until_matches_hflm(model_and_tokenizer):
    ref, ours = _pair(model_and_tokenizer, batch_size=4)
    args = [
        ("Shall I compare thee to a", {"until": ["\n", "."], "max_gen_toks": 16}),
        ("The capital of France is", {"until": ["."], "max_gen_toks": 16}),
        ("Once upon a time, there", {"until": ["."], "max_gen_toks": 16}),
        ("1, 2, 3, 4,", {"until": [" 9"], "max_gen_toks": 10, "do_sample": False}),
    ]
    reqs = _requests("generate_until", args)
    expected = ref.generate_until(reqs, disable_tqdm=True)
    got = ours.generate_until(reqs)
    print(f"[lm-equivalence] generate_until: {got!r}")
    assert got == expected
    for text, (_, kw) in zip(got, args):
        assert not any(s in text for s in kw["until"])


# ---------------------------------------------------------------- harness helpers


def test_extract_metrics_and_eval_result_round_trip():
    from evaluators.harness import EvalResult, extract_metrics

    raw = {
        "shakespeare_ppl": {
            "alias": "shakespeare_ppl",
            "word_perplexity,none": 41.5,
            "word_perplexity_stderr,none": "N/A",
            "bits_per_byte,none": 1.2,
            "sample_len": 3,
        },
        "gen": {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1, "acc,none": 1},
    }
    metrics = extract_metrics(raw)
    assert metrics == {
        "shakespeare_ppl": {"word_perplexity": 41.5, "bits_per_byte": 1.2},
        "gen": {"exact_match,strict-match": 0.5, "acc": 1.0},
    }
    res = EvalResult(metrics={"t": {"acc": 0.25, "ppl": float("nan")}}, fidelity="full", tokens_evaluated=10,
                     wall_time_s=1.5, limit=5, lm_eval_version="0.4.13", samples={"t": 5}, seed=0)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    back = EvalResult.from_dict(d)
    assert back.metrics["t"]["acc"] == 0.25 and math.isnan(back.metrics["t"]["ppl"])
    assert (back.fidelity, back.tokens_evaluated, back.wall_time_s, back.limit, back.samples) == ("full", 10, 1.5, 5,
                                                                                                  {"t": 5})
    with pytest.raises(KeyError, match="available"):
        back.metric("t", "missing")


def test_run_tasks_on_a_local_task(model_and_tokenizer, tmp_path):
    """simple_evaluate drives TorchLM through all three request types; metrics come back flat."""
    from lm_eval.tasks import TaskManager

    from evaluators.harness import run_tasks
    from evaluators.lm import TorchLM

    docs = [
        {"text": "Shall I compare thee to a summer's day? Thou art more lovely.", "ctx": "Shall I compare thee to a summer's",
         "choices": [" day", " night"], "gold": 0, "word": " day"},
        {"text": "To be, or not to be, that is the question.", "ctx": "To be, or not to be, that is the",
         "choices": [" question", " answer"], "gold": 0, "word": " question"},
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "t_ppl.yaml").write_text(
        "task: t_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
    )
    (tmp_path / "t_mc.yaml").write_text(
        "task: t_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{ctx}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tmp_path / "t_gen.yaml").write_text(
        "task: t_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{ctx}}'\ndoc_to_target: '{{word}}'\n"
        "generation_kwargs:\n  until: ['.', '\\n']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    model, tokenizer = model_and_tokenizer
    lm = TorchLM(model, tokenizer, batch_size=4, disable_tqdm=True)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    t0 = time.perf_counter()
    res = run_tasks(lm, ["t_ppl", "t_mc", "t_gen"], tm, limit=None, seed=0)
    print(f"[lm-equivalence] run_tasks: {res.to_dict()} in {time.perf_counter() - t0:.1f}s")
    assert set(res.metrics) == {"t_ppl", "t_mc", "t_gen"}
    assert set(res.metrics["t_ppl"]) == {"word_perplexity"} and res.metrics["t_ppl"]["word_perplexity"] > 1
    assert 0 <= res.metrics["t_mc"]["acc"] <= 1 and 0 <= res.metrics["t_gen"]["exact_match"] <= 1
    assert res.samples == {"t_ppl": 2, "t_mc": 2, "t_gen": 2}
    assert res.tokens_evaluated == lm.tokens_scored > 0
    assert res.fidelity == "full" and res.limit is None and res.lm_eval_version and res.wall_time_s > 0


# ---------------------------------------------------------------- real requests from the local task suites


SUITE_TASKS = ["shakespeare_lastword", "shakespeare_cloze", "shakespeare_ppl"]


def _suite_tasks() -> dict:
    """The local task suites as lm-eval Task objects (datasets read offline)."""
    tasks_mod = pytest.importorskip("evaluators.tasks", reason="evaluators.tasks (the local task suites) not available")
    if hasattr(tasks_mod, "get_task_dict"):
        return tasks_mod.get_task_dict(SUITE_TASKS, 0)
    if not hasattr(tasks_mod, "task_manager"):
        pytest.skip("evaluators.tasks has neither get_task_dict() nor task_manager()")
    from lm_eval.tasks import get_task_dict

    return get_task_dict(SUITE_TASKS, tasks_mod.task_manager(0))


def test_suite_requests_match_hflm(model_and_tokenizer):
    """Requests built by the project's own tasks score the same under TorchLM and HFLM.

    About 35 s (of which ~10 s indexing lm-eval's task configs), so not marked slow.
    """
    loaded = _suite_tasks()
    ref, ours = _pair(model_and_tokenizer, batch_size=8)
    for name in SUITE_TASKS:
        task = loaded[name]
        task.build_all_requests(limit=6)
        reqs = [inst for inst in task.instances]
        kind = reqs[0].request_type
        assert all(r.request_type == kind for r in reqs)
        if kind == "loglikelihood":
            expected = ref.loglikelihood(reqs, disable_tqdm=True)
            got = ours.loglikelihood(reqs)
            diffs = [abs(a[0] - b[0]) for a, b in zip(expected, got)]
            assert [a[1] for a in expected] == [b[1] for b in got]
        elif kind == "loglikelihood_rolling":
            expected = ref.loglikelihood_rolling(reqs, disable_tqdm=True)
            got = ours.loglikelihood_rolling(reqs)
            diffs = [abs(a - b) for a, b in zip(expected, got)]
        else:
            expected = ref.generate_until(reqs, disable_tqdm=True)
            got = ours.generate_until(reqs)
            assert got == expected
            diffs = []
        worst = _note(f"{name} ({kind})", diffs)
        assert worst <= TOL, f"{name}: max |diff| {worst}"
