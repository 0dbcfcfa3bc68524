"""The Ray side of a study: connect to Ray (a cluster or a local instance) and start the evaluator actors
(:class:`dse.workers.EvaluatorActor`, one model each), and kill them at the end.

A local Ray (no ``ray.address``, no $RAY_ADDRESS) belongs to the process that started it: all its services (GCS,
raylet and object manager, dashboard agent and metrics exporter, runtime-env agent, workers) listen on 127.0.0.1
only, their output goes to the session's log files (``/tmp/ray/session_*/logs``, Ray's default temp dir), and
:func:`kill_actors` shuts it down, so no Ray process outlives the study. With any Ray, the messages Ray pushes to the
driver (the ``(raylet) A worker died ...`` lines, also in the session's ``logs/events``) are not printed on stdout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from dse.spec import SpecError, StudySpec

_local_ray = False
"""Whether this process started the Ray it is connected to (:func:`start_actors`)."""


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


@contextlib.contextmanager
def _loopback_node():
    """While a local Ray starts: its node address is 127.0.0.1, so every service binds the loopback interface
    (Ray binds all interfaces for any other node address; it takes the loopback one itself where clusters are
    disabled, ``ENABLE_RAY_CLUSTER`` false on Windows and macOS, and that is the switch used here)."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """``ray.init`` replaces the SIGTERM handler by one that kills Ray's processes and exits at once; a handler the
    caller installed (``dse`` unwinds the driver on SIGTERM, :func:`dse.cli.main`) is put back, so the driver's
    cleanup (interrupted trials re-queued, actors killed, Ray shut down) runs first."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _init_ray(spec: StudySpec, address: str | None) -> None:
    """Connect to the Ray at ``address``, or start a local one (``spec.workers`` x ``spec.threads_per_worker`` CPUs
    at least, no Ray dashboard, on the loopback interface)."""
    import ray

    global _local_ray
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    with _keeping_sigterm_handler():
        if address:
            source = "ray.address" if spec.ray_address else "RAY_ADDRESS"
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # no line per connection retry
            problem = _unreachable(address)
            if problem:
                raise SpecError(source, f"cannot connect to the Ray cluster at '{address}': {problem}")
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as err:
                reason = str(err).strip().splitlines()[0][:200]
                raise SpecError(source, f"cannot connect to the Ray cluster at '{address}': {reason}") from None
        else:
            with _loopback_node():
                ray.init(num_cpus=max(os.cpu_count() or 1, spec.workers * spec.threads_per_worker),
                         include_dashboard=False, **quiet)
            _local_ray = True
    ray._private.worker._worker_logs_enabled = False  # Ray's messages to the driver: in the session log, not stdout


def start_actors(spec: StudySpec) -> list:
    """Connect to Ray (the spec's ``ray.address``, else $RAY_ADDRESS, else a local instance) and start
    ``spec.workers`` evaluator actors, one model each. An already initialised Ray is used as it is."""
    import ray

    from dse.workers import WORKER_ENV, EvaluatorActor

    if not ray.is_initialized():
        _init_ray(spec, spec.ray_address or os.environ.get("RAY_ADDRESS"))
    return [
        EvaluatorActor.options(num_cpus=spec.threads_per_worker, runtime_env={"env_vars": WORKER_ENV}).remote(
            spec.model, spec.tasks, spec.task_seed, spec.batch_size, spec.threads_per_worker, spec.compression,
            spec.proxy, spec.task_paths)
        for _ in range(spec.workers)
    ]


def kill_actors(actors: list) -> None:
    """Kill the actors; a local Ray that :func:`start_actors` started is shut down as well (its GCS, raylet and
    worker processes exit)."""
    global _local_ray
    if actors or _local_ray:
        import ray

        try:
            for actor in actors:
                ray.kill(actor)
        finally:
            if _local_ray:
                _local_ray = False
                ray.shutdown()
