"""Running lm-eval tasks on a :class:`~evaluators.lm.TorchLM` and keeping the numbers that matter.

``run_tasks(lm, tasks, task_manager, limit=None, seed=0)`` calls
``lm_eval.simple_evaluate`` on the in-memory model with

* every seed (python, numpy, torch, few-shot) set to ``seed``;
* no response cache, no request cache, no sample logging;
* ``bootstrap_iters=0`` (no bootstrapped standard errors, they dominate the run time);
* lm-eval's loggers at WARNING for the duration of the call;
* lm-eval's environment report skipped (it runs ``git`` and torch's
  ``collect_env`` subprocesses, about 2 s per call) unless ``env_info=True``.

It returns an :class:`EvalResult`: ``{task: {metric: value}}`` with lm-eval's
``,none`` filter suffix removed (other filters stay as ``metric,filter``) and
the ``*_stderr`` and ``alias`` entries dropped, plus the tokens the model
processed and the wall time.

Progress bars: :class:`TorchLM` has ``disable_tqdm``; the bar lm-eval shows
while building requests obeys only the ``TQDM_DISABLE=1`` environment variable
(read when tqdm is imported), so set it in worker processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evaluators.lm import TorchLM

log = logging.getLogger(__name__)

RESULT_SCHEMA_VERSION = 1


@dataclass
class EvalResult:
    """Accuracy of one model on a task suite, as stored in a trial's user attributes.

    ``metrics`` maps task name -> metric name -> value (floats; ``nan`` where
    lm-eval could not compute one). ``fidelity`` names how the numbers were
    obtained (``"full"`` for a complete lm-eval run, ``"limit"`` style labels
    or ``"proxy"`` for cheaper ones). ``limit`` is the per-task document limit
    passed to lm-eval (``None``: all documents); ``samples`` is the number of
    documents lm-eval actually scored per task.
    """

    metrics: dict[str, dict[str, float]]
    fidelity: str = "full"
    tokens_evaluated: int = 0
    wall_time_s: float = 0.0
    limit: int | float | None = None
    lm_eval_version: str = ""
    samples: dict[str, int] = field(default_factory=dict)
    seed: int | None = None
    schema_version: int = RESULT_SCHEMA_VERSION

    def metric(self, task: str, name: str) -> float:
        """One value, with a one-line error naming what exists when it does not."""
        try:
            return self.metrics[task][name]
        except KeyError:
            have = {t: sorted(m) for t, m in self.metrics.items()}
            raise KeyError(f"metric {task}/{name} not in result; available: {have}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``nan``/``inf`` become ``None``, so strict JSON encoders accept it)."""
        d = asdict(self)
        d["metrics"] = {
            task: {name: (v if isinstance(v, float) and math.isfinite(v) else None) for name, v in vals.items()}
            for task, vals in self.metrics.items()
        }
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict` (``None`` metrics come back as ``nan``; unknown keys are ignored)."""
        if not isinstance(data, dict) or "metrics" not in data:
            raise ValueError("EvalResult: expected a dict with a 'metrics' field")
        metrics = {
            str(task): {str(name): (float("nan") if v is None else float(v)) for name, v in vals.items()}
            for task, vals in data["metrics"].items()
        }
        known = {f for f in cls.__dataclass_fields__ if f != "metrics"}
        rest = {k: v for k, v in data.items() if k in known}
        if "samples" in rest and rest["samples"] is not None:
            rest["samples"] = {str(k): int(v) for k, v in rest["samples"].items()}
        return cls(metrics=metrics, **rest)


def extract_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the ``results`` section of lm-eval's output.

    Drops ``alias``, ``sample_len``, ``*_stderr`` entries and non-numeric values; strips the
    ``,none`` (no filter) suffix.
    """
    out: dict[str, dict[str, float]] = {}
    for task, vals in results.items():
        metrics: dict[str, float] = {}
        for key, value in vals.items():
            if key in ("alias", "samples", "sample_len"):
                continue
            name, _, filt = key.partition(",")
            if name.endswith("_stderr"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metrics[name if filt in ("", "none") else f"{name},{filt}"] = float(value)
        out[task] = metrics
    return out


@contextlib.contextmanager
def _quiet_lm_eval(level: int, env_info: bool):
    """Raise lm-eval's log level and (unless ``env_info``) skip its slow environment report."""
    import lm_eval.evaluator as ev

    logger = logging.getLogger("lm_eval")
    old_level = logger.level
    logger.setLevel(level)
    patched: dict[str, Any] = {}
    if not env_info:
        stubs = {
            "add_env_info": _light_env_info,
            "get_git_commit_hash": lambda: None,
        }
        for name, stub in stubs.items():
            if hasattr(ev, name):
                patched[name] = getattr(ev, name)
                setattr(ev, name, stub)
    try:
        yield
    finally:
        for name, orig in patched.items():
            setattr(ev, name, orig)
        logger.setLevel(old_level)


def _light_env_info(storage: dict[str, Any]) -> None:
    import lm_eval
    import torch
    import transformers

    storage.update(
        {
            "pretty_env_info": f"torch {torch.__version__}",
            "transformers_version": transformers.__version__,
            "lm_eval_version": lm_eval.__version__,
            "upper_git_hash": None,
        }
    )


def run_tasks(
    lm: TorchLM,
    tasks: list[str],
    task_manager: Any,
    limit: int | float | None = None,
    seed: int = 0,
    *,
    fidelity: str = "full",
    num_fewshot: int | None = None,
    log_level: int = logging.WARNING,
    env_info: bool = False,
) -> EvalResult:
    """Evaluate ``lm`` on ``tasks`` (names known to ``task_manager``) and return the numeric metrics.

    ``limit`` caps the documents per task (an int, or a fraction < 1 as lm-eval
    accepts); ``seed`` seeds python, numpy, torch and the few-shot sampler.
    ``tokens_evaluated`` is the increase of ``lm.tokens_scored`` during the call.
    """
    import lm_eval

    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks: expected at least one task name")
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise ValueError(f"limit: expected a positive number or None, got {limit!r}")

    tokens_before = int(getattr(lm, "tokens_scored", 0))
    start = time.perf_counter()
    with _quiet_lm_eval(log_level, env_info):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=task_manager,
            num_fewshot=num_fewshot,
            limit=limit,
            use_cache=None,
            cache_requests=False,
            bootstrap_iters=0,
            check_integrity=False,
            write_out=False,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    wall = time.perf_counter() - start
    if out is None:  # only on non-zero ranks, which a TorchLM never is
        raise RuntimeError("lm_eval.simple_evaluate returned no results")

    samples: dict[str, int] = {}
    for task, counts in (out.get("n-samples") or {}).items():
        if isinstance(counts, dict) and "effective" in counts:
            samples[task] = int(counts["effective"])
    return EvalResult(
        metrics=extract_metrics(out.get("results", {})),
        fidelity=fidelity,
        tokens_evaluated=int(getattr(lm, "tokens_scored", 0)) - tokens_before,
        wall_time_s=wall,
        limit=limit,
        lm_eval_version=lm_eval.__version__,
        samples=samples,
        seed=seed,
    )
