"""The Ray side of a study: connect to Ray (a cluster or a local instance) and start the evaluator actors
(:class:`dse.workers.EvaluatorActor`, one model each), and kill them at the end."""

from __future__ import annotations

import os

from dse.spec import SpecError, StudySpec


def _unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why a ``host:port`` (or ``ray://host:port``) Ray address does not accept connections, else None
    (Ray itself retries an unreachable address for minutes). ``auto`` and other forms are left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as err:
        return err.strerror or str(err)


def start_actors(spec: StudySpec) -> list:
    """Connect to Ray (the spec's ``ray.address``, else $RAY_ADDRESS, else a local instance) and start
    ``spec.workers`` evaluator actors, one model each."""
    import ray

    from dse.workers import WORKER_ENV, EvaluatorActor

    address = spec.ray_address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            source = "ray.address" if spec.ray_address else "RAY_ADDRESS"
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # no line per connection retry
            problem = _unreachable(address)
            if problem:
                raise SpecError(source, f"cannot connect to the Ray cluster at '{address}': {problem}")
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                reason = str(err).strip().splitlines()[0][:200]
                raise SpecError(source, f"cannot connect to the Ray cluster at '{address}': {reason}") from None
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, spec.workers * spec.threads_per_worker),
                     include_dashboard=False, log_to_driver=False)
    return [
        EvaluatorActor.options(num_cpus=spec.threads_per_worker, runtime_env={"env_vars": WORKER_ENV}).remote(
            spec.model, spec.tasks, spec.task_seed, spec.batch_size, spec.threads_per_worker, spec.compression,
            spec.proxy)
        for _ in range(spec.workers)
    ]


def kill_actors(actors: list) -> None:
    if actors:
        import ray

        for actor in actors:
            ray.kill(actor)
