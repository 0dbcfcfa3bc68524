"""Model loading: the embedded default against its published facts, any local HF directory, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dse.cli import main
from evaluators.models import ModelError, builtin_model_dir, linear_layer_names, load_model, resolve_model_path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "default.yaml"


def test_default_model_matches_its_known_facts():
    model, tokenizer = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once
    assert len(linear_layer_names(model)) == 30 * 7 + 1
    assert "quantization_config" not in config.to_dict(), "the cached copy is a plain safetensors model"
    assert (builtin_model_dir("smollm2-135m") / "model.safetensors").exists()
    ids = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.inference_mode():
        nll = model(ids, labels=ids).loss.item()
    assert nll < 5.0, "a working language model, not random weights (ln 49152 = 10.8)"


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A small random Llama saved as a plain Hugging Face directory, with the default model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(builtin_model_dir("smollm2-135m")).save_pretrained(path)
    return path


def test_any_local_hf_directory_loads(tiny_hf_dir):
    model, _ = load_model(str(tiny_hf_dir))
    assert model.config.num_hidden_layers == 2
    assert linear_layer_names(model)[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


def test_spec_on_a_local_directory_validates_against_its_layers(tiny_hf_dir, tmp_path, capsys):
    """The layer groups are matched against the directory's own config (2 blocks), before any storage write."""
    from dse.spec import parse_spec
    from dse.study import prepare

    data = yaml.safe_load(EXAMPLE.read_text())
    data["model"] = str(tiny_hf_dir)
    setup = prepare(parse_spec(data))
    assert len(setup.units) == 2 + 2 + 1  # attn and mlp per block, one head unit
    data["space"]["groups"][0]["targets"] = r"model\.layers\.[5-9]\.self_attn\.q_proj"
    data["storage"] = f"sqlite:///{tmp_path / 'x.db'}"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    assert main(["start", str(tmp_path / "s.yaml")]) == 2
    assert "space.groups[0].targets" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("name,message", [
    ("/no/such/model", "model: '/no/such/model' is not a built-in model (smollm2-135m), an existing Hugging Face "
                       "directory, or a hub id 'org/name'"),
    ("weights.bin", "model: 'weights.bin' is not a built-in model"),
])
def test_unknown_models_are_one_line_errors(name, message):
    with pytest.raises(ModelError) as err:
        resolve_model_path(name)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_the_layer_cache_fingerprint_is_the_content_not_the_directory(tiny_hf_dir, tmp_path):
    """The same weights loaded from two directories have one fingerprint (so they share the layer cache), and a
    copy whose one weight is one ulp larger has another (every byte is hashed, not a sample)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from evaluators.compress.cache import model_fingerprint

    same, changed = tmp_path / "same", tmp_path / "changed"
    shutil.copytree(tiny_hf_dir, same)
    shutil.copytree(tiny_hf_dir, changed)
    weights = load_file(changed / "model.safetensors")
    w = weights["model.layers.1.mlp.down_proj.weight"]
    w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})

    models = [load_model(str(path))[0] for path in (tiny_hf_dir, same, changed)]
    assert len({m.config._name_or_path for m in models}) == 3, "three directories"
    original, edited = models[0].state_dict(), models[2].state_dict()
    assert sum(int((original[k] != edited[k]).sum()) for k in original) == 1, "one weight differs, by one ulp"
    fingerprints = [model_fingerprint(m) for m in models]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
