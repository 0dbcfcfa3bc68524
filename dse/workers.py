"""Ray evaluator actors: each loads the base model once and evaluates plans on request.

An actor keeps the dense weights in memory (:class:`~evaluators.compress.PlanApplier`)
so a trial only loads or computes the layers its plan names (the layer cache on disk is
shared by every actor on the machine), then measures the proxy fidelity and, when asked,
runs the spec's lm-eval tasks through the project's :class:`~evaluators.lm.TorchLM`.
"""

from __future__ import annotations

import os
import socket
import time

import ray

from dse.spec import TaskSpec
from evaluators.settings import CompressionSpec, ProxySpec


def accuracy_of(metrics: dict[str, dict[str, float]], tasks: tuple[TaskSpec, ...]) -> float:
    """The accuracy objective: mean over tasks of each task's chosen metric."""
    return sum(float(metrics[t.name][t.metric]) for t in tasks) / len(tasks)


class Evaluator:
    """Evaluates plans on one loaded model (the body of the Ray actor; usable without Ray).

    At start it loads the model, the proxy token set and the dense reference (cached on disk
    once per model), so each proxy evaluation is one apply (mostly cache loads) and one
    forward pass over the proxy tokens. ``task_paths``: the spec's task directories (absolute
    paths, read on the actor's machine), known to its lm-eval task manager.
    """

    def __init__(self, model: str, tasks: tuple[TaskSpec, ...], task_seed: int, batch_size: int, threads: int,
                 compression: CompressionSpec | None = None, proxy: ProxySpec | None = None,
                 task_paths: tuple[str, ...] = ()):
        import torch

        from evaluators.compress import PlanApplier
        from evaluators.fidelity import ProxySet, dense_reference
        from evaluators.lm import TorchLM
        from evaluators.models import load_model
        from evaluators.tasks import task_manager

        torch.set_num_threads(threads)
        started = time.perf_counter()
        proxy = proxy or ProxySpec()
        self.model, self.tokenizer = load_model(model)
        self.applier = PlanApplier(self.model, self.tokenizer, compression)
        self.proxy = ProxySet.build(self.tokenizer, proxy.windows, proxy.seq_len)
        self.reference = dense_reference(self.model, self.proxy, self.applier.cache)
        self.lm = TorchLM(self.model, self.tokenizer, batch_size=batch_size, disable_tqdm=True)
        self.tasks = tasks
        self.task_manager = task_manager(task_seed, task_paths)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.load_s = time.perf_counter() - started

    def evaluate(self, plan_json: str, fidelities: tuple[str, ...] = ("proxy",)) -> dict:
        """Apply the plan and measure the named fidelities; returns a JSON-able dict with a ``proxy``
        entry (kl, ppl in nats/token and perplexity) and/or a ``full`` entry (task metrics, accuracy)."""
        from dse.plan import ModelPlan
        from evaluators.fidelity import full_eval, proxy_eval

        started = time.perf_counter()
        applied = self.applier.apply(ModelPlan.from_json(plan_json))
        timings = {"apply": time.perf_counter() - started}
        out: dict = {"compression": applied.summary(), "worker": self.worker}
        if "proxy" in fidelities:
            result = proxy_eval(self.model, self.proxy, self.reference, self.applier.dense_output_head())
            out["proxy"] = {**result.metrics["proxy"], "tokens_evaluated": result.tokens_evaluated}
            timings["proxy"] = result.wall_time_s
        if "full" in fidelities:
            result = full_eval(self.lm, self.tasks, self.task_manager)
            out["full"] = {"metrics": result.metrics, "accuracy": accuracy_of(result.metrics, self.tasks),
                           "tokens_evaluated": result.tokens_evaluated,
                           "limits": {t.name: t.limit for t in self.tasks}}
            timings["full"] = result.wall_time_s
        out["timings_s"] = timings
        return out

    def ping(self) -> str:
        """This actor's worker id (the driver waits on it to know the model is loaded)."""
        return self.worker


EvaluatorActor = ray.remote(num_cpus=1, max_restarts=2, max_task_retries=1)(Evaluator)
"""A crashed actor process is restarted (model reloaded) and its evaluation retried once."""

WORKER_ENV = {
    "TQDM_DISABLE": "1",             # lm-eval's request-building bars honour only this, set before import
    "OMP_WAIT_POLICY": "PASSIVE",    # idle OpenMP threads must not spin on a shared CPU
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}
"""Environment of every evaluator actor process."""
