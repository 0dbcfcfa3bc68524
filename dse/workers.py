"""Ray evaluator actors: each loads the base model once and evaluates plans on request.

An actor keeps the dense weights in memory (:class:`~evaluators.compress.PlanApplier`)
so a trial only re-compresses the layers its plan names, then runs the spec's
lm-eval tasks through the project's :class:`~evaluators.lm.TorchLM`.
"""

from __future__ import annotations

import os
import socket
import time

import ray

from dse.spec import CompressionSpec, TaskSpec


def accuracy_of(metrics: dict[str, dict[str, float]], tasks: tuple[TaskSpec, ...]) -> float:
    """The accuracy objective: mean over tasks of each task's chosen metric."""
    return sum(float(metrics[t.name][t.metric]) for t in tasks) / len(tasks)


class Evaluator:
    """Evaluates plans on one loaded model (the body of the Ray actor; usable without Ray)."""

    def __init__(self, model: str, tasks: tuple[TaskSpec, ...], task_seed: int, batch_size: int, threads: int,
                 compression: CompressionSpec | None = None):
        import torch

        from evaluators.compress import PlanApplier
        from evaluators.lm import TorchLM
        from evaluators.models import load_model
        from evaluators.tasks import task_manager

        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.model, self.tokenizer = load_model(model)
        self.applier = PlanApplier(self.model, self.tokenizer, compression)
        self.lm = TorchLM(self.model, self.tokenizer, batch_size=batch_size, disable_tqdm=True)
        self.tasks = tasks
        self.task_manager = task_manager(task_seed)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.load_s = time.perf_counter() - started

    def evaluate(self, plan_json: str) -> dict:
        """Apply the plan and run every task; returns the evaluation as a JSON-able dict."""
        from dse.plan import ModelPlan
        from evaluators.fidelity import full_eval

        started = time.perf_counter()
        applied = self.applier.apply(ModelPlan.from_json(plan_json))
        applied_s = time.perf_counter() - started
        result = full_eval(self.lm, self.tasks, self.task_manager)
        return {
            "fidelity": "full",
            "metrics": result.metrics,
            "accuracy": accuracy_of(result.metrics, self.tasks),
            "tokens_evaluated": result.tokens_evaluated,
            "limits": {t.name: t.limit for t in self.tasks},
            "compression": applied.summary(),
            "timings_s": {"apply": applied_s, "eval": time.perf_counter() - started - applied_s},
            "worker": self.worker,
        }


EvaluatorActor = ray.remote(num_cpus=1, max_restarts=1)(Evaluator)

WORKER_ENV = {
    "TQDM_DISABLE": "1",             # lm-eval's request-building bars honour only this, set before import
    "OMP_WAIT_POLICY": "PASSIVE",    # idle OpenMP threads must not spin on a shared CPU
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}
"""Environment of every evaluator actor process."""
