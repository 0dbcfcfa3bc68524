"""Real 3-trial studies with MLGRU blocks on tiny models of two attention geometries (driver, Ray, SQLite).

A tiny grouped-KV Llama (4 query heads over 2 KV heads, heads x head_dim = hidden) and a tiny Gemma-3
(4 heads x head_dim 32 = 128 != hidden 64, one KV head, sliding-window blocks), each a randomly
initialised Hugging Face directory built here with the default model's tokenizer. Every trial must
complete (none failed), and at least one must have replaced attention by a distilled MLGRU, costed on
the hidden -> hidden projections the evaluator built.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dse.records import TrialRecords  # noqa: E402
from dse.spec import parse_spec  # noqa: E402
from dse.study import run_study  # noqa: E402
from evaluators.models import DEFAULT_MODEL, resolve_model_path  # noqa: E402
from helpers import small_spec  # noqa: E402

GEOMETRIES = {
    "llama-gqa": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                  "num_key_value_heads": 2},
    "gemma3": {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 16},
}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def model_dir(root, name: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fields = {**GEOMETRIES[name], "num_hidden_layers": 4, "vocab_size": 49152, "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2, "tie_word_embeddings": True}
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    path = root / name
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL)).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_three_trial_mlgru_study_completes(name, tmp_path, ray_session, empty_compress_cache):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    data = small_spec(url, f"mlgru-{name}", trials=3)
    data.update(model=str(model_dir(tmp_path, name)), workers=1, constraints=[])
    data["space"] = {"tie": "block", "mlgru_blocks": [2, 3], "groups": [
        {"name": "blocks", "targets": r"model\.layers\.\d+\..*", "sparsity": ["dense", "2:4"],
         "formats": ["ternary", 4], "group_size": 32}]}
    data["compression"] = {"windows": 4, "seq_len": 64, "distill_steps": 20}
    data["promotion"] = {"every": 0, "final": False}
    study = run_study(parse_spec(data), progress=False)

    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 3, states
    records = TrialRecords.of(study)
    mlgru_trials = [t for t in study.trials if any(b["mixer"] == "mlgru" for b in records.plan(t)["blocks"])]
    assert mlgru_trials, "the MatMul-free warm start (ternary + MLGRU) is one of the three trials"
    for t in mlgru_trials:
        assert t.user_attrs["evaluated"] and t.values[0] > 0  # proxy KL measured on the model with the MLGRU
        mixers = t.user_attrs["eval"]["compression"]["mixers"]
        assert mixers and all(m["mse_final"] < m["mse_initial"] for m in mixers.values())
        rows = {row["name"]: row for row in records.report(t)["layers"]}
        for block in (b["index"] for b in records.plan(t)["blocks"] if b["mixer"] == "mlgru"):
            for proj in ("f_proj", "c_proj", "g_proj", "o_proj"):  # hidden -> hidden, whatever heads x head_dim
                assert rows[f"model.layers.{block}.mlgru.{proj}"]["macs"] == 64 * 64


def test_spec_check_sees_the_mlgru_widths_before_any_storage(tmp_path):
    """On Gemma-3's geometry o_proj reads heads x head_dim = 128 features and its MLGRU replacement 64: an N:M
    pattern that fits the attention but not the MLGRU is a one-line spec error, and no study file appears."""
    from dse.spec import SpecError
    from dse.study import prepare

    db = tmp_path / "studies.db"
    data = small_spec(f"sqlite:///{db}", "mlgru-check", trials=3)
    data.update(model=str(model_dir(tmp_path, "gemma3")), constraints=[])
    data["space"] = {"tie": "block", "mlgru_blocks": [3], "groups": [
        {"name": "o", "targets": r"model\.layers\.\d+\.self_attn\.o_proj", "sparsity": ["dense", "1:128"]}]}
    with pytest.raises(SpecError) as err:
        prepare(parse_spec(data))
    assert str(err.value) == ("space.groups[0].sparsity[1]: M=128 does not divide in_features 64 of "
                              "model.layers.3.mlgru.o_proj")
    data["space"]["mlgru_blocks"] = []
    prepare(parse_spec(data))  # without the MLGRU block the pattern fits
    assert not db.exists()
