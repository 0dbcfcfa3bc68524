"""The driver loop: ask Optuna for plans, screen them on the cost model, evaluate the rest on Ray actors, tell.

One trial:

1. ``study.ask()`` (enqueued warm starts and retried plans first), the plan from its
   parameters and, when the spec's ``hardware:`` lists choices, the accelerator from its ``hw.<field>``
   parameters (:mod:`dse.space`, :mod:`dse.hardware`; otherwise the spec's one accelerator);
2. the hardware report of the (plan, accelerator) pair from the cost model, in the driver
   (milliseconds); the plan, the accelerator (:meth:`~hwcost.accelerator.Accelerator.to_dict`) and
   the whole report (with its per-layer rows) are written as the trial's records, its scalar metrics
   (``hw_metrics``, a few hundred bytes) and the searched accelerator fields (``accelerator``, only
   when some are searched) as user attributes. A pair that does not fit the device or breaks a user
   constraint is told at once with its named constraint values (``trial.set_constraint``) and no
   accuracy evaluation (``evaluated: False``). A hardware-only study (no objective needs the model)
   starts no Ray actors: every trial is told from the cost model, a feasible one as evaluated at
   fidelity ``hwcost`` (so it enters the Pareto set);
3. a feasible plan is claimed (:mod:`dse.claims`): a plan another trial already evaluated is
   told with that trial's evaluation (``duplicate_of``; the hardware objectives are its own
   accelerator's) instead of being evaluated again; one still being evaluated elsewhere is pruned;
4. otherwise an idle Ray actor measures the proxy fidelity (and the full lm-eval tasks when
   ``accuracy`` is an objective); the result is told as soon as it arrives.

Promotion: every ``promotion.every`` completed trials and at the end, the Pareto trials without a
full-fidelity result are evaluated on the full tasks (:func:`dse.study.full_results`). Each promotion says
when it starts (``promoting trial 12 to full fidelity (tasks: a, b)``) and when it ends (``trial 12 full:
accuracy 0.31 (41 s)``), above the progress bar (or in the log at INFO level when no bar is shown).

Persistence: the driver records a heartbeat for each trial it runs (Optuna's heartbeat, every
``heartbeat_s``); trials whose heartbeat is older than three intervals (a killed driver) are
failed and their parameters re-enqueued (``RetryFailedTrialCallback``), by any driver of the
study. The budget counts completed trials; trials in flight anywhere count against it, so the
study ends with exactly ``spec.trials`` completed trials.

Failures: an evaluation that raises fails its trial with the exception's last line as its ``error``
attribute; one whose objective values are not all finite (a NaN or infinite proxy KL or accuracy: a plan
that overflows the model) fails its trial with ``error`` naming them (``proxy_kl is nan``) and
``not_finite: True``, and a later trial of the same plan is failed the same way without a second evaluation
(``duplicate_of``). Non-finite values are never told to Optuna. A failed trial does not count against the
budget, so the study goes on with other plans: one plan's failure is the plan's outcome, not the study's.
Systematic failure stops the driver with :class:`EvaluationError` (one line): ``MAX_FAILURES_IN_A_ROW``
evaluations in a row that raise (a task metric lm-eval does not report, data that went away: every
evaluation fails the same way), or more failed trials than twice the budget (nearly every plan of the space
fails: better changed than searched).
A killed evaluator actor is restarted by Ray and its evaluation retried (:data:`dse.workers.EvaluatorActor`),
so the driver sees the result as if nothing happened.

Storage outages: every storage operation of the loop (reading trials, ask, tell, attributes, records,
claims, heartbeats) that fails because the database is unreachable (a connection refused or dropped, a
locked SQLite file) waits ``STORAGE_RETRY_S`` and is tried again, with one line on stderr per outage
(``storage unreachable (<reason>); retrying every 5 s``). Results that arrive meanwhile stay in memory (in
Ray's object store and in the driver) and are told once the storage is back; a tell, attribute, record or
claim write is idempotent, so one whose reply was lost is simply written again. Before failing stale trials
after an outage the driver records its own trials' heartbeats, so it never fails its own work. A trial cut
off while it was being started (asked, suggested, screened) is failed and its parameters re-enqueued, as a
killed driver's are; an ask cut off after Optuna created its trial leaves a trial nobody knows, which gets
one heartbeat so that it goes stale and is failed and retried like any other.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from dse.space import suggest_accelerator, suggest_plan
from dse.spec import ACCURACY
from dse.study import (FULL_PREFIX, Setup, full_results, objective_values, retry_callback, screen, trial_record,
                       trial_records)

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 3
"""Evaluations in a row that raise before the driver stops (systematic failure)."""
MAX_FAILED_PER_BUDGET = 2
"""Failed trials per trial of the budget before the driver stops (a space whose plans mostly fail)."""
STORAGE_RETRY_S = 5.0
"""Seconds between attempts while the storage is unreachable."""


class EvaluationError(RuntimeError):
    """Evaluations keep failing (e.g. a task metric lm-eval does not report); the message is one line."""


def storage_outage(err: BaseException) -> str | None:
    """Why ``err`` (or an error it was raised from) says the database is unreachable, in one line, else None.

    Connection errors (refused, dropped, timed out, a locked SQLite file) are SQLAlchemy's OperationalError,
    InterfaceError or DisconnectionError, or a DBAPIError that invalidated its connection; Optuna wraps them
    in StorageInternalError. Integrity and programming errors are bugs, not outages."""
    import sqlalchemy as sa

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError)) or (
                isinstance(err, sa.exc.DBAPIError) and err.connection_invalidated):
            reason = str(getattr(err, "orig", None) or err).strip()
            return (reason.splitlines() or [type(err).__name__])[0][:200]
        err = err.__cause__ or err.__context__
    return None


@dataclass
class Job:
    """One evaluation in flight on an actor: a trial (proxy) or a promotion (full)."""

    kind: str                      # "trial" | "full"
    actor: object
    trial: optuna.trial.Trial | None = None
    number: int = -1
    trial_id: int = -1
    report: object = None
    timings: dict = field(default_factory=dict)
    plan_hash: str = ""


class Heartbeat(threading.Thread):
    """Records Optuna heartbeats of the driver's running trials and refreshes its promotion claims."""

    def __init__(self, storage, claims, interval_s: float):
        super().__init__(daemon=True, name="dse-heartbeat")
        self.storage, self.claims, self.interval_s = storage, claims, interval_s
        self.trial_ids: set[int] = set()
        self.full_keys: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def beat(self) -> None:
        """Record one heartbeat of every tracked trial and promotion claim; raises what the storage raises."""
        with self.lock:
            ids, keys = list(self.trial_ids), list(self.full_keys)
        for trial_id in ids:
            self.storage.record_heartbeat(trial_id)
        self.claims.touch("full", keys)

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as err:  # the storage away: the next beat (or the driver loop's) retries
                log.debug("heartbeat: %s", err)


class Driver:
    """The ask -> screen -> evaluate -> tell loop of one driver process (module docstring)."""

    def __init__(self, setup: Setup, study: optuna.Study, storage, actors: list, claims, bar, records=None):
        from dse.records import TrialRecords, study_key

        self.setup, self.spec, self.study, self.storage = setup, setup.spec, study, storage
        self.records = records or TrialRecords(storage.engine, study_key(study), create=True)
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.actors, self.idle = actors, list(actors)
        self.claims, self.bar = claims, bar
        self.jobs: dict = {}           # ray ObjectRef -> Job
        self.failures_in_a_row = 0     # evaluations in a row that raised
        self.failed = 0                # trials this driver failed (raised, not finite, or a copy of a non-finite one)
        self.promoted_at = 0           # completed count at the last periodic promotion
        self.down_since: float | None = None  # time.monotonic() when the storage became unreachable
        self.starting: dict = {}       # the trial being started (trial, trial_id, plan_hash): see _start_guarded
        self.heartbeat = Heartbeat(storage, claims, self.spec.heartbeat_s)
        self.fidelities = ("proxy", "full") if any(o.name == ACCURACY for o in self.spec.objectives) else ("proxy",)
        self.model_objective = self.spec.needs_model

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        import ray

        self.heartbeat.start()
        try:
            while True:
                trials = self._io(self._sync)
                complete = sum(t.state == TrialState.COMPLETE for t in trials)
                running = sum(t.state == TrialState.RUNNING for t in trials)
                self._io(self._show, trials)
                if complete >= self.spec.trials and not self.jobs:
                    break
                self._io(self._promote_if_due, trials, complete)
                launched = self._launch(complete, running)
                if not self.jobs:
                    if not launched:  # trials in flight elsewhere (another driver, or stale): wait for them
                        time.sleep(min(2.0, self.spec.heartbeat_s))
                    continue
                ready, _ = ray.wait(list(self.jobs), num_returns=1, timeout=self.spec.heartbeat_s)
                for ref in ready:
                    self._finish(ref)
            if self.spec.promotion.final:
                self._io(self.promote, final=True)
        finally:
            self.heartbeat.stop.set()
            self._abandon()

    def _sync(self) -> list:
        """The study's trials, after our heartbeats (old after an outage: we never fail our own trials) and
        failing the stale trials of any driver."""
        self.heartbeat.beat()
        self._fail_stale()
        return self.study.get_trials(deepcopy=False)

    def _launch(self, complete: int, running: int) -> bool:
        """Start trials on idle actors while the budget allows; True if any trial was told or started."""
        any_progress = False
        while (self.idle or not self.model_objective) and complete + running < self.spec.trials:
            outcome = self._start_guarded()
            any_progress = True
            if outcome == "complete":
                complete += 1
            elif outcome == "running":
                running += 1
            else:  # pruned or failed (duplicate in flight, over budget, cut off): look at the storage again first
                break
        return any_progress

    def _start_guarded(self) -> str:
        """:meth:`_start_trial`; a start cut off by a storage outage is abandoned once the storage is back."""
        self.starting = {}
        try:
            return self._start_trial()
        except Exception as err:
            if not self._wait_for_storage(err):
                raise
        self._io(self._abandon_start)
        return "pruned"

    def _abandon_start(self) -> None:
        """Fail the trial whose start an outage cut off and re-enqueue its parameters; when the ask itself was
        cut off, the trial Optuna may have created is unknown to us: one heartbeat for every running trial we
        do not track lets it go stale (another driver's live trial just gets one early heartbeat)."""
        trial = self.starting.get("trial")
        if trial is not None:
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
            self._fail_and_retry(trial, trial_id, self.starting.get("plan_hash"), "storage unreachable while the "
                                                                                   "trial was being started")
            return
        with self.heartbeat.lock:
            ours = set(self.heartbeat.trial_ids)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            if trial_id not in ours:
                self.storage.record_heartbeat(trial_id)

    def _start_trial(self) -> str:
        from hwcost import estimate
        from hwcost.accelerator import AcceleratorError

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # heartbeat storage outside Study.optimize
            trial = self.study.ask()
        self.starting["trial"] = trial
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
        self._track(trial_id)
        if self._over_budget(trial):
            self._tell(trial, trial_id, state=TrialState.PRUNED, attrs={"pruned": "over budget (another driver)"})
            return "pruned"
        spec, hardware = self.spec, self.setup.hardware
        plan = suggest_plan(trial, self.setup.units, spec.space.mlgru_blocks)
        accel = self.setup.accelerator
        if hardware is not None and hardware.searched:
            try:
                accel = suggest_accelerator(trial, hardware)
            except AcceleratorError as err:  # a combination beyond the spec's pairwise check (dse.hardware)
                self._tell(trial, trial_id, state=TrialState.FAIL, attrs={"error": str(err)})
                log.error("trial %d: %s", trial.number, err)
                return "pruned"
        started = time.perf_counter()
        report = estimate(plan, self.setup.workload, accel)
        timings = {"hwcost": time.perf_counter() - started}
        constraints = screen(spec, report)
        attrs = trial_record(plan, report, constraints, hardware.searched_values(accel) if hardware else None)
        # before the tell: a told trial has its records
        self.records.put(trial.number, **trial_records(plan, report, accel))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a retried trial carries its constraints already
            for key, value in constraints.items():
                trial.set_constraint(key, value)
        if max(constraints.values()) > 0:
            self._tell(trial, trial_id, objective_values(spec, report, None),
                       attrs={**attrs, "evaluated": False, "timings_s": timings})
            return "complete"
        if not self.model_objective:  # a hardware-only study: the cost model is the whole evaluation
            self._tell(trial, trial_id, objective_values(spec, report, None),
                       attrs={**attrs, "evaluated": True, "fidelity": "hwcost", "timings_s": timings})
            return "complete"
        self.starting["plan_hash"] = plan.hash  # before the claim: one cut off after its insert is released
        held = self.claims.claim("plan", plan.hash, trial.number)
        if held is not None:
            owner = self._trial(held.trial)
            if owner is not None and owner.state == TrialState.COMPLETE and owner.user_attrs.get("evaluated"):
                evaluation = owner.user_attrs["eval"]
                self._tell(trial, trial_id, objective_values(spec, report, evaluation),
                           attrs={**attrs, "evaluated": True, "eval": evaluation, "fidelity": owner.user_attrs.get(
                               "fidelity"), "duplicate_of": owner.number, "timings_s": timings})
                return "complete"
            if owner is not None and owner.state == TrialState.FAIL and owner.user_attrs.get("not_finite"):
                error = owner.user_attrs["error"]  # the same plan gives the same values: not evaluated again
                self._tell(trial, trial_id, state=TrialState.FAIL, attrs={
                    **attrs, "error": error, "not_finite": True, "duplicate_of": owner.number})
                log.error("trial %d failed: %s (as trial %d)", trial.number, error, owner.number)
                self._count_failure(error, raised=False)
                return "failed"
            gone = owner is None or owner.state in (TrialState.FAIL, TrialState.PRUNED)
            if not (gone and self.claims.take_over("plan", plan.hash, held, trial.number)):
                self._tell(trial, trial_id, state=TrialState.PRUNED,
                           attrs={**attrs, "pruned": f"plan being evaluated by trial {held.trial}",
                                  "duplicate_of": held.trial})
                return "pruned"
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        actor = self.idle.pop()
        ref = actor.evaluate.remote(plan.to_json(), self.fidelities)
        self.jobs[ref] = Job("trial", actor, trial, trial.number, trial_id, report, timings, plan.hash)
        return "running"

    def _over_budget(self, trial) -> bool:
        """Another driver took the last budget slot between our count and our ask."""
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        ahead = sum(t.state == TrialState.COMPLETE or t.number < trial.number for t in trials)
        return ahead >= self.spec.trials

    def _finish(self, ref) -> None:
        import ray

        job = self.jobs.pop(ref)
        self.idle.append(job.actor)
        try:
            evaluation = ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
            self._failed(job, str(err).strip().splitlines()[-1][:500])
            return
        if job.kind == "full":
            self.failures_in_a_row = 0
            self.heartbeat.full_keys.discard(str(job.number))
            self._io(self.study.set_user_attr, f"{FULL_PREFIX}{job.number}", {
                **evaluation["full"], "worker": evaluation["worker"], "timings_s": evaluation["timings_s"]})
            self._say(f"trial {job.number} full: accuracy {evaluation['full']['accuracy']:.4g} "
                      f"({evaluation['timings_s']['full']:.0f} s)")
            return
        values = objective_values(self.spec, job.report, evaluation)
        not_finite = [f"{o.name} is {v}" for o, v in zip(self.spec.objectives, values) if not math.isfinite(v)]
        if not_finite:
            self._not_finite(job, ", ".join(not_finite), evaluation["worker"])
            return
        self.failures_in_a_row = 0
        timings = {**job.timings, **evaluation["timings_s"]}
        self._tell(job.trial, job.trial_id, values, attrs={
            "evaluated": True, "eval": evaluation, "fidelity": "+".join(self.fidelities),
            "worker": evaluation["worker"], "timings_s": timings})

    def _failed(self, job: Job, error: str) -> None:
        """An evaluation that raised: its trial fails and its plan is free for another try."""
        if job.kind == "full":
            self.heartbeat.full_keys.discard(str(job.number))
            self._io(self.claims.release, "full", str(job.number))
            log.error("full evaluation of trial %d failed: %s", job.number, error)
        else:
            self._tell(job.trial, job.trial_id, state=TrialState.FAIL, attrs={"error": error})
            self._io(self.claims.release, "plan", job.plan_hash, job.number)
            log.error("trial %d failed: %s", job.number, error)
        self._count_failure(error, raised=True)

    def _not_finite(self, job: Job, error: str, worker: str) -> None:
        """An evaluation whose objective values are not finite: the plan's own outcome, so its trial fails and
        its claim stays (no trial evaluates the plan again)."""
        self._tell(job.trial, job.trial_id, state=TrialState.FAIL,
                   attrs={"error": error, "not_finite": True, "worker": worker})
        log.error("trial %d failed: %s", job.number, error)
        self._count_failure(error, raised=False)

    def _count_failure(self, error: str, raised: bool) -> None:
        """Count a failed trial and stop on systematic failure (module docstring); a non-finite result ends a
        run of evaluations that raised (the evaluation itself worked)."""
        self.failed += 1
        self.failures_in_a_row = self.failures_in_a_row + 1 if raised else 0
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise EvaluationError(f"{self.failures_in_a_row} evaluations in a row failed; last: {error}")
        if self.failed > MAX_FAILED_PER_BUDGET * self.spec.trials:
            raise EvaluationError(f"{self.failed} trials failed, more than {MAX_FAILED_PER_BUDGET} x the budget of "
                                  f"{self.spec.trials}; last: {error}")

    # ------------------------------------------------------------------ promotion
    def _promote_if_due(self, trials, complete: int) -> None:
        every = self.spec.promotion.every
        if every and complete - self.promoted_at >= every and "full" not in self.fidelities:
            self.promote(final=False, trials=trials)
            self.promoted_at = complete - complete % every

    def promote(self, final: bool, trials=None) -> None:
        """Evaluate the Pareto trials without a full result on the full tasks; with ``final``, wait for them.
        Safe to repeat (after a storage outage): promotions in flight are not started again."""
        import ray

        from dse.pareto import study_front

        if "full" in self.fidelities or not self.model_objective:
            return
        front = study_front(self.study, trials)
        have = full_results(self.study)
        for trial in front:
            key = str(trial.number)
            if trial.number in have or key in self.heartbeat.full_keys or not self._claim_full(trial.number):
                continue
            actor = self._idle_actor() if final else (self.idle.pop() if self.idle else None)
            if actor is None:
                self.claims.release("full", key)
                break
            self.heartbeat.full_keys.add(key)
            ref = actor.evaluate.remote(json.dumps(self.records.plan(trial)), ("full",))
            self.jobs[ref] = Job("full", actor, number=trial.number)
            self._say(f"promoting trial {trial.number} to full fidelity "
                      f"(tasks: {', '.join(t.name for t in self.spec.tasks)})")
        while final and self.jobs:
            ready, _ = ray.wait(list(self.jobs), num_returns=1)
            self._finish(ready[0])

    def _idle_actor(self):
        import ray

        while not self.idle:
            ready, _ = ray.wait(list(self.jobs), num_returns=1)
            self._finish(ready[0])
        return self.idle.pop()

    def _claim_full(self, number: int) -> bool:
        key = str(number)
        held = self.claims.claim("full", key, number)
        if held is None:
            return True
        stale = time.time() - held.heartbeat > 3 * self.spec.heartbeat_s
        return stale and self.claims.take_over("full", key, held, number)

    # ------------------------------------------------------------------ storage outages
    def _io(self, operation, *args, **kwargs):
        """``operation(*args, **kwargs)``, tried again every STORAGE_RETRY_S while the storage is unreachable
        (module docstring); ``operation`` must be safe to repeat."""
        while True:
            try:
                result = operation(*args, **kwargs)
            except Exception as err:
                if not self._wait_for_storage(err):
                    raise
                continue
            if self.down_since is not None:
                log.info("storage reachable again after %.0f s", time.monotonic() - self.down_since)
                self.down_since = None
            return result

    def _wait_for_storage(self, err: BaseException) -> bool:
        """Whether ``err`` is a storage outage (:func:`storage_outage`); if so, say so once per outage and wait
        STORAGE_RETRY_S."""
        reason = storage_outage(err)
        if reason is None:
            return False
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("storage unreachable (%s); retrying every %g s", reason, STORAGE_RETRY_S)
        time.sleep(STORAGE_RETRY_S)
        return True

    # ------------------------------------------------------------------ bookkeeping
    def _tell(self, trial, trial_id: int, values=None, state=None, attrs: dict | None = None) -> None:
        """Set the attributes and tell, through storage outages (a repeated tell of a told trial is skipped).
        A trial another driver failed meanwhile (our heartbeats lapsed: it was re-enqueued) keeps that state."""
        try:
            self._io(self._tell_once, trial, values, state, attrs or {})
        except optuna.exceptions.UpdateFinishedTrialError:
            told = self._io(self.storage.get_trial, trial_id)
            if told.state != (state or TrialState.COMPLETE) or (values is not None and told.values != values):
                log.warning("trial %d was failed by another driver (its heartbeat lapsed) and its plan retried; "
                            "this result is dropped", trial.number)
        self._untrack(trial_id)

    def _tell_once(self, trial, values, state, attrs: dict) -> None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self.study.tell(trial, values, state=state, skip_if_finished=True)

    def _track(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)
        with self.heartbeat.lock:
            self.heartbeat.trial_ids.add(trial_id)

    def _untrack(self, trial_id: int) -> None:
        with self.heartbeat.lock:
            self.heartbeat.trial_ids.discard(trial_id)

    def _trial(self, number: int):
        for t in self.study.get_trials(deepcopy=False):
            if t.number == number:
                return t
        return None

    def _fail_stale(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def _say(self, message: str) -> None:
        """A progress line: above the progress bar when it is shown (``tqdm.write``), else in the log (INFO)."""
        if self.bar.disable:
            log.info(message)
        else:
            self.bar.write(message, file=sys.stderr)

    def _show(self, trials) -> None:
        from dse.pareto import is_feasible, study_front, study_hypervolume

        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        feasible = sum(is_feasible(t) for t in complete)
        self.bar.n = min(len(complete), self.bar.total)
        self.bar.set_postfix_str(
            f"feasible {feasible}/{len(complete)}, pareto {len(study_front(self.study, complete))}, "
            f"hv {study_hypervolume(self.study, complete):.3f}, running {len(self.jobs)}", refresh=False)
        self.bar.refresh()

    def _fail_and_retry(self, trial, trial_id: int, plan_hash: str | None, error: str) -> None:
        """Fail a trial this driver cannot finish, release its plan and re-enqueue its parameters (at most
        MAX_RETRIES times, as for a stale trial)."""
        self._tell(trial, trial_id, state=TrialState.FAIL, attrs={"error": error})
        if plan_hash:
            self._io(self.claims.release, "plan", plan_hash, trial.number)
        self._io(retry_callback(), self.study, self._io(self.storage.get_trial, trial_id))

    def _abandon(self) -> None:
        """On the way out (error, Ctrl-C): our unfinished trials are failed and re-enqueued."""
        for job in self.jobs.values():
            if job.kind == "trial":
                self._fail_and_retry(job.trial, job.trial_id, job.plan_hash, "driver stopped")
            else:
                self.claims.release("full", str(job.number))
        self.jobs.clear()
