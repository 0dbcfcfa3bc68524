"""The user's own lm-eval tasks: a spec's ``task_paths`` names directories of task YAMLs (lm-eval's include_path).

The test writes a small multiple-choice task (a local JSONL read by lm-eval's ``json`` dataset) and runs a real
study on a tiny random Llama built here, promoted to the full fidelity; the dense trial's accuracy on the task must
equal lm-eval's own ``HFLM`` on the same model with a TaskManager of that directory. Bad directories are refused
before any work with one line naming ``task_paths[i]``, and a resumed study whose task file was edited is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import optuna
import pytest
import yaml

from dse.cli import main

TASK = "my_task"
LIMIT = 4
DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " a small green frog", " 1917", " the ocean"],
     "label": 0},
    {"question": "Two plus two equals", "choices": [" blue", " four", " a violin", " yesterday"], "label": 1},
    {"question": "Water freezes at zero degrees", "choices": [" Kelvin", " happily", " Celsius", " north"],
     "label": 2},
    {"question": "A dog says", "choices": [" meow", " moo", " quack", " woof"], "label": 3},
    {"question": "The sun rises in the", "choices": [" east", " west", " cupboard", " song"], "label": 0},
]


def write_task(folder: Path, name: str = TASK) -> Path:
    """A multiple-choice lm-eval task ``name`` in ``folder``: its JSONL data and its YAML; returns the YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    config = {"task": name, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "output_type": "multiple_choice", "doc_to_text": "question", "doc_to_choice": "choices",
              "doc_to_target": "label",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1.0}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-block Llama (hidden 64) with the default model's tokenizer, as a Hugging Face directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evaluators.models import DEFAULT_MODEL, resolve_model_path

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.2)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL)).save_pretrained(path)
    return path


def spec_data(model: Path, storage: str, study: str, task_paths: list[str]) -> dict:
    """A small study of ``model`` on the user's task: 3 trials on 1 worker, the final Pareto set promoted."""
    return {
        "study": study, "model": str(model), "storage": storage, "task_paths": task_paths,
        "tasks": [{"name": TASK, "metric": "acc", "limit": LIMIT}],
        "space": {"groups": [{"name": "mlp", "targets": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
                              "sparsity": ["dense", "2:4"], "formats": [16, 8], "group_size": 64}]},
        "hardware": {"device": "kria-kv260"},
        "objectives": ["proxy_kl", "weight_bytes"],
        "sampler": {"name": "random", "seed": 0}, "trials": 3, "workers": 1,
        "proxy": {"windows": 1, "seq_len": 32}, "compression": {"windows": 1, "seq_len": 32},
        "promotion": {"every": 0, "final": True}, "heartbeat_s": 2,
    }


def write_spec(folder: Path, data: dict) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def hflm_accuracy(model: Path, task_dir: Path) -> float:
    """lm-eval's own accuracy of the dense ``model`` on the task (HFLM, a TaskManager of ``task_dir`` only)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=HFLM(pretrained=str(model), batch_size=1, device="cpu"), tasks=[TASK],
                                  task_manager=TaskManager(include_path=[str(task_dir)], include_defaults=False),
                                  limit=LIMIT, bootstrap_iters=0)
    return float(out["results"][TASK]["acc,none"])


def test_study_runs_a_task_of_a_local_directory(tiny_model, tmp_path, capsys):
    import ray

    task_yaml = write_task(tmp_path / "mytasks")
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = write_spec(tmp_path, spec_data(tiny_model, url, "user-task", ["mytasks"]))  # relative to the spec file
    try:
        assert main(["start", str(spec), "--no-progress"]) == 0
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name="user-task", storage=url)
    stored = study.user_attrs["spec"]["task_paths"]
    assert stored == [{"path": str(tmp_path / "mytasks"),
                       "files": {"my_task.yaml": hashlib.sha256(task_yaml.read_bytes()).hexdigest()}}]
    dense = next(t for t in study.trials if t.user_attrs.get("warm_start") == "dense")
    full = study.user_attrs.get(f"full:{dense.number}")
    assert full is not None, "the dense trial (proxy KL 0: on every Pareto front) was not promoted"
    assert full["limits"] == {TASK: LIMIT}
    assert abs(full["metrics"][TASK]["acc"] - hflm_accuracy(tiny_model, tmp_path / "mytasks")) <= 1e-6
    assert full["accuracy"] == full["metrics"][TASK]["acc"]

    # resuming with an edited task file is refused before any work, naming the file
    task_yaml.write_text(task_yaml.read_text().replace("version: 1.0", "version: 2.0"))
    capsys.readouterr()
    assert main(["start", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: task_paths[0].files.my_task.yaml: stored '")


def test_evaluate_runs_a_task_of_a_local_directory(tiny_model, tmp_path, capsys):
    write_task(tmp_path / "mytasks")
    spec = write_spec(tmp_path, spec_data(tiny_model, f"sqlite:///{tmp_path / 's.db'}", "evaluate", ["mytasks"]))
    plan = tmp_path / "dense.yaml"
    plan.write_text("layers: []\nblocks: []\n")
    assert main(["evaluate", str(spec), "--plan", str(plan), "--fidelity", "full"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["full"]["metrics"][TASK]["acc"] - hflm_accuracy(tiny_model, tmp_path / "mytasks")) <= 1e-6


@pytest.mark.parametrize("case", ["missing", "no-yaml", "a-file"])
def test_bad_task_directory_is_one_line(case, tmp_path, capsys):
    folder = tmp_path / "tasks"
    if case == "no-yaml":
        folder.mkdir()
        (folder / "my_task.yml").write_text("task: my_task\n")  # lm-eval reads *.yaml only
        (folder / "data.jsonl").write_text("{}\n")
    elif case == "a-file":
        folder.write_text("task: my_task\n")
    good = tmp_path / "good"
    write_task(good)
    spec = write_spec(tmp_path, spec_data(Path("unused-model"), f"sqlite:///{tmp_path / 's.db'}", "bad",
                                          ["good", "tasks"]))
    assert main(["start", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    expected = "holds no .yaml file" if case == "no-yaml" else "is not a directory"
    assert err.startswith(f"error: task_paths[1]: '{folder}' {expected}"), err
    assert not (tmp_path / "s.db").exists()


def test_task_whose_data_is_missing_is_one_line(tiny_model, tmp_path, capsys):
    write_task(tmp_path / "mytasks")
    (tmp_path / "mytasks" / f"{TASK}.jsonl").unlink()
    data = spec_data(tiny_model, f"sqlite:///{tmp_path / 's.db'}", "no-data", ["mytasks"])
    assert main(["start", str(write_spec(tmp_path, data)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: tasks[0].name: cannot load "), err
    assert f"'{TASK}'" in err and f"{TASK}.jsonl" in err  # the task and the file it misses
    assert not (tmp_path / "s.db").exists()


def test_unknown_task_names_the_task_paths(tiny_model, tmp_path, capsys):
    write_task(tmp_path / "mytasks", name="other_task")
    data = spec_data(tiny_model, f"sqlite:///{tmp_path / 's.db'}", "unknown", ["mytasks"])
    assert main(["start", str(write_spec(tmp_path, data)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: tasks: unknown lm-eval task name(s) '{TASK}'"), err
    assert f"task_paths ({tmp_path / 'mytasks'})" in err
    assert not (tmp_path / "s.db").exists()


def test_identity_compares_task_files_not_where_they_are(tmp_path):
    import shutil

    from dse.identity import comparable, differences
    from dse.spec import parse_spec

    def spec_dict(folders: list[Path]) -> dict:
        return parse_spec(spec_data(Path("m"), "sqlite:///s.db", "ident", [str(f) for f in folders])).to_dict()

    def identity(folder: Path) -> dict:
        return comparable(spec_dict([folder]), {}, {})

    first = tmp_path / "a"
    yaml_file = write_task(first)
    shutil.copytree(first, tmp_path / "b")
    assert differences(identity(first), identity(tmp_path / "b")) == []  # moved: the same tasks
    stored = identity(first)
    (first / "sub").mkdir()
    (first / "sub" / "utils.py").write_text("def f(doc):\n    return doc\n")
    assert [d[0] for d in differences(stored, identity(first))] == ["task_paths[0].files.sub/utils.py"]
    yaml_file.write_text(yaml_file.read_text() + "num_fewshot: 1\n")
    assert [d[0] for d in differences(stored, identity(first))] == ["task_paths[0].files.my_task.yaml",
                                                                    "task_paths[0].files.sub/utils.py"]
    old = {k: v for k, v in spec_dict([]).items() if k != "task_paths"}  # stored before task_paths existed
    assert differences(comparable(old, {}, {}), comparable(spec_dict([]), {}, {})) == []
    assert [d[0] for d in differences(comparable(old, {}, {}), identity(first))] == ["task_paths"]
