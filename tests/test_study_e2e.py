"""End to end on the real default model: a small real study on SQLite and on the real PostgreSQL server,
then ``dse status`` and ``dse export`` reading what the study stored (the SQLite study is the session fixture
``sqlite_study`` of conftest.py; the dashboard's tests read it too)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import optuna
import pytest
import yaml

from dse.cli import main
from dse.records import TrialRecords
from dse.report import pareto_trials
from dse.spec import parse_spec
from dse.study import full_results, run_study
from helpers import PG_URL, SMALL_TRIALS as TRIALS, small_spec


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def check_study(study: optuna.Study, spec) -> None:
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == TRIALS
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert study.metric_names == ["proxy_kl", "decode_tokens_per_s", "j_per_token"]
    evaluated = [t for t in complete if t.user_attrs["evaluated"]]
    assert evaluated, "at least one plan should pass the hardware screen"
    records = TrialRecords.of(study)
    for t in complete:
        hw = records.report(t)  # the plan and the per-layer report are records, not user attributes
        assert "plan" not in t.user_attrs and "hw" not in t.user_attrs and len(hw["layers"]) > 200
        assert t.values[1] == pytest.approx(hw["decode_tokens_per_s"])
        assert t.values[2] == pytest.approx(hw["j_per_token"])
        small = t.user_attrs["hw_metrics"]  # the report's scalars, stored apart for light readers
        assert small["weight_bytes"] == hw["weight_bytes_total"] and small["bram_util"] == hw["utilisation"]["bram36"]
        assert small["lut_util"] == hw["utilisation"]["lut"] and small["prefill_ms"] == hw["prefill_ms"]
        assert len(records.plan(t)["layers"]) == 211 and t.user_attrs["plan_hash"]
        assert len(json.dumps(t.user_attrs)) < 4000  # the scalars: about 1 kB (the records: about 100 kB)
        if t.user_attrs["evaluated"]:
            ev = t.user_attrs["eval"]
            assert t.values[0] == ev["proxy"]["kl"] and t.user_attrs["fidelity"] == "proxy"
            assert t.values[0] > 0 and ev["proxy"]["ppl"] > 1 and ev["proxy"]["tokens_evaluated"] == 2 * 64
            assert set(t.user_attrs["timings_s"]) >= {"hwcost", "apply", "proxy"}
        else:
            assert max(t.constraints.values()) > 0 and "eval" not in t.user_attrs and t.values[0] == float("inf")
        assert set(t.constraints) == {"fits", *(str(c) for c in spec.constraints)}
        assert t.user_attrs["constraints"] == t.constraints
    json.dumps([t.user_attrs for t in complete])  # everything stored is plain JSON
    assert len({t.user_attrs["worker"] for t in evaluated if "duplicate_of" not in t.user_attrs}) >= 1
    # the final promotion: every Pareto trial has the full tasks' results, accuracy = mean of the chosen metrics
    full = full_results(study)
    front = pareto_trials(study)
    assert front and {t.number for t in front} <= set(full)
    for number in {t.number for t in front}:
        metrics = full[number]["metrics"]
        expected = (metrics["shakespeare_lastword"]["acc"] + metrics["shakespeare_cloze"]["acc_norm"]) / 2
        assert full[number]["accuracy"] == pytest.approx(expected) and full[number]["tokens_evaluated"] > 0


def test_study_on_sqlite(sqlite_study):
    study, url = sqlite_study
    check_study(study, parse_spec(small_spec(url, "e2e-sqlite")))


def test_study_on_postgresql(ray_session):
    name = f"e2e-pg-{os.getpid()}"
    try:
        spec = parse_spec(small_spec(PG_URL, name))
        study = run_study(spec, progress=False)
        check_study(optuna.load_study(study_name=name, storage=PG_URL), spec)
        assert study.user_attrs["spec"]["storage"] == PG_URL
    finally:
        try:
            optuna.delete_study(study_name=name, storage=PG_URL)
        except KeyError:
            pass


def test_stored_proxy_and_exported_checkpoint_match_a_fresh_evaluation(sqlite_study, tmp_path):
    """Re-apply one evaluated trial's plan in this process: its proxy equals what the driver stored, and the
    checkpoint `dse export --checkpoint` writes reloads with logits equal to this model's to 1e-5."""
    import torch

    from dse.plan import ModelPlan
    from evaluators.compress import PlanApplier
    from evaluators.fidelity import ProxySet, dense_reference, proxy_eval
    from evaluators.models import load_model

    study, url = sqlite_study
    spec = parse_spec(small_spec(url, "e2e-sqlite"))
    trial = max((t for t in study.trials if t.user_attrs.get("evaluated") and "duplicate_of" not in t.user_attrs),
                key=lambda t: len(t.user_attrs["plan_summary"]))  # the most varied plan
    torch.set_num_threads(1)
    model, tokenizer = load_model(spec.model)
    applier = PlanApplier(model, tokenizer, spec.compression)  # first, as the actors: the 16-bit model
    proxy = ProxySet.build(tokenizer, spec.proxy.windows, spec.proxy.seq_len)
    reference = dense_reference(model, proxy)
    plan = TrialRecords.of(study).plan(trial)
    applier.apply(ModelPlan.from_dict(plan))
    result = proxy_eval(model, proxy, reference, applier.dense_output_head())  # as the actors evaluate
    assert result.metric("proxy", "kl") == pytest.approx(trial.values[0], rel=1e-4, abs=1e-6)
    assert result.metric("proxy", "ppl") == pytest.approx(trial.user_attrs["eval"]["proxy"]["ppl"], rel=1e-4)

    from evaluators.checkpoint import load_checkpoint

    assert main(["export", "e2e-sqlite", "--storage", url, "--trial", str(trial.number), "--checkpoint",
                 "--format", "dse-packed", "--out", str(tmp_path)]) == 0
    loaded, _ = load_checkpoint(tmp_path / "checkpoint")
    ids = proxy.input_ids[:, :32]
    with torch.inference_mode():
        expected, got = model(ids).logits, loaded(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5

    # the default format: plain transformers reproduces the evaluated logits, or the export refuses in one line
    from transformers import AutoModelForCausalLM

    from evaluators.hf_export import ExportFormatError, plan_layout

    stock = tmp_path / "stock"
    try:
        plan_layout(ModelPlan.from_dict(plan))
    except ExportFormatError:
        assert main(["export", "e2e-sqlite", "--storage", url, "--trial", str(trial.number), "--checkpoint",
                     "--out", str(stock)]) == 2 and not stock.exists()
        return
    assert main(["export", "e2e-sqlite", "--storage", url, "--trial", str(trial.number), "--checkpoint",
                 "--out", str(stock)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(str(stock / "checkpoint"), dtype=torch.float32).eval()
    with torch.inference_mode():
        assert (plain(ids).logits - expected).abs().max().item() <= 1e-4


def test_status_and_export(sqlite_study, capsys, tmp_path):
    study, url = sqlite_study
    assert main(["status", "e2e-sqlite", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"study e2e-sqlite in {url}: model smollm2-135m, device kria-kv260, "
                                   f"budget {TRIALS} trials")
    assert f"complete={TRIALS}" in out and "proxy_kl" in out and "full_accuracy" in out and "hypervolume" in out
    assert main(["export", "e2e-sqlite", "--storage", url, "--pick", "max-accuracy", "--out", str(tmp_path)]) == 0
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    full = full_results(study)
    best = max(pareto_trials(study), key=lambda t: full[t.number]["accuracy"])
    assert full[plan["trial"]]["accuracy"] == full[best.number]["accuracy"]
    chosen = study.trials[plan["trial"]]
    records = TrialRecords.of(study)
    assert plan["plan"] == records.plan(chosen)
    assert json.loads((tmp_path / "hw_report.json").read_text()) == records.report(chosen)
    assert json.loads((tmp_path / "evaluation.json").read_text()) == {**chosen.user_attrs["eval"],
                                                                       "full": full[chosen.number]}
    assert "fits: True" in (tmp_path / "summary.txt").read_text()


def test_status_of_unknown_study_is_one_line(sqlite_study, capsys):
    _, url = sqlite_study
    assert main(["status", "nope", "--storage", url]) == 2
    assert capsys.readouterr().err == "error: STUDY: 'nope' is not in " + url + "; studies there: e2e-sqlite\n"


def test_restart_with_other_objectives_is_refused_without_change(sqlite_study, tmp_path, capsys):
    study, url = sqlite_study
    db = Path(url.removeprefix("sqlite:///"))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    data = small_spec(url, "e2e-sqlite")
    data["objectives"] = [{"name": "accuracy"}, {"name": "power_w"}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    assert main(["start", str(tmp_path / "s.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: objectives: stored [{'name': 'proxy_kl', 'direction': 'minimize'}, ") and \
        err.count("\n") == 1 and f"study 'e2e-sqlite' in {url} was run with the stored values" in err, err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_metric_lm_eval_does_not_report_is_refused_before_any_trial(sqlite_study, tmp_path, capsys):
    """A task metric lm-eval does not report is one line before Ray starts or the study is created (it used to
    fail only at evaluation); the storage holding another study is byte-identical."""
    _, url = sqlite_study
    db = Path(url.removeprefix("sqlite:///"))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    data = small_spec(url, "e2e-bad-metric")
    data["tasks"] = [{"name": "shakespeare_lastword", "metric": "accuracy", "limit": 2}]
    data["objectives"] = [{"name": "accuracy"}, {"name": "decode_tokens_per_s"}]  # the full tasks on every trial
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    assert main(["start", str(tmp_path / "s.yaml"), "--no-progress"]) == 2
    assert capsys.readouterr().err == ("error: tasks[0].metric: 'accuracy' is not a metric lm-eval reports for "
                                       "shakespeare_lastword; it reports perplexity, acc\n")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert "e2e-bad-metric" not in optuna.get_all_study_names(url)


def test_export_picks_and_where_against_brute_force(sqlite_study, capsys, tmp_path):
    """Each --pick equals the brute-force choice over the stored feasible trials; --where filters first."""
    import numpy as np

    from dse.export import choose_trial

    study, url = sqlite_study
    feasible = [t for t in study.get_trials() if t.state.name == "COMPLETE" and t.user_attrs["evaluated"]]
    hw = {t.number: TrialRecords.of(study).report(t) for t in feasible}
    assert choose_trial(study, pick="min-latency").number == min(hw, key=lambda n: hw[n]["decode_ms_per_token"])
    assert choose_trial(study, pick="min-energy").number == min(hw, key=lambda n: hw[n]["j_per_token"])
    # knee: nearest to the ideal point with every objective scaled to [0, 1] over the front (losses: -tokens/s)
    front = pareto_trials(study)
    loss = np.array([[t.values[0], -t.values[1], t.values[2]] for t in front])
    scaled = (loss - loss.min(0)) / np.where(np.ptp(loss, 0) > 0, np.ptp(loss, 0), 1)
    assert choose_trial(study, pick="knee").number == front[int(np.argmin((scaled ** 2).sum(1)))].number
    slowest = min(hw[n]["decode_tokens_per_s"] for n in hw)
    where = [f"decode_tokens_per_s>={slowest + 1e-6}"]
    allowed = {n for n in hw if hw[n]["decode_tokens_per_s"] >= slowest + 1e-6}
    if allowed:
        assert choose_trial(study, pick="min-energy", where=where).number in allowed
    assert main(["export", "e2e-sqlite", "--storage", url, "--where", "decode_tokens_per_s>=1e9",
                 "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --where: no feasible trial of study 'e2e-sqlite' has decode_tokens_per_s >= 1e+09\n"
    assert not (tmp_path / "none").exists()
