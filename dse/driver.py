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
full-fidelity result are evaluated on the full tasks (:func:`dse.study.full_results`).

Persistence: the driver records a heartbeat for each trial it runs (Optuna's heartbeat, every
``heartbeat_s``); trials whose heartbeat is older than three intervals (a killed driver) are
failed and their parameters re-enqueued (``RetryFailedTrialCallback``), by any driver of the
study. The budget counts completed trials; trials in flight anywhere count against it, so the
study ends with exactly ``spec.trials`` completed trials.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from dse.space import suggest_accelerator, suggest_plan
from dse.spec import ACCURACY, MODEL_OBJECTIVES
from dse.study import (FULL_PREFIX, Setup, full_results, objective_values, retry_callback, screen, trial_record,
                       trial_records)

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 3


class EvaluationError(RuntimeError):
    """Evaluations keep failing (e.g. a task metric lm-eval does not report); the message is one line."""


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
        with self.lock:
            ids, keys = list(self.trial_ids), list(self.full_keys)
        for trial_id in ids:
            try:
                self.storage.record_heartbeat(trial_id)
            except Exception as err:  # a finished trial or a storage hiccup: the next beat retries
                log.debug("heartbeat of trial id %d: %s", trial_id, err)
        self.claims.touch("full", keys)

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.beat()


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
        self.failures_in_a_row = 0
        self.promoted_at = 0           # completed count at the last periodic promotion
        self.heartbeat = Heartbeat(storage, claims, self.spec.heartbeat_s)
        self.fidelities = ("proxy", "full") if any(o.name == ACCURACY for o in self.spec.objectives) else ("proxy",)
        self.model_objective = any(o.name in MODEL_OBJECTIVES for o in self.spec.objectives)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        import ray

        self.heartbeat.start()
        try:
            while True:
                self._fail_stale()
                trials = self.study.get_trials(deepcopy=False)
                complete = sum(t.state == TrialState.COMPLETE for t in trials)
                running = sum(t.state == TrialState.RUNNING for t in trials)
                self._show(trials)
                if complete >= self.spec.trials and not self.jobs:
                    break
                self._promote_if_due(trials, complete)
                launched = self._launch(complete, running)
                if not self.jobs:
                    if not launched:  # trials in flight elsewhere (another driver, or stale): wait for them
                        time.sleep(min(2.0, self.spec.heartbeat_s))
                    continue
                ready, _ = ray.wait(list(self.jobs), num_returns=1, timeout=self.spec.heartbeat_s)
                for ref in ready:
                    self._finish(ref)
            if self.spec.promotion.final:
                self.promote(final=True)
        finally:
            self.heartbeat.stop.set()
            self._abandon()

    def _launch(self, complete: int, running: int) -> bool:
        """Start trials on idle actors while the budget allows; True if any trial was told or started."""
        any_progress = False
        while (self.idle or not self.model_objective) and complete + running < self.spec.trials:
            outcome = self._start_trial()
            any_progress = True
            if outcome == "complete":
                complete += 1
            elif outcome == "running":
                running += 1
            else:  # pruned (duplicate in flight, over budget): look at the storage again first
                break
        return any_progress

    def _start_trial(self) -> str:
        from hwcost import estimate
        from hwcost.accelerator import AcceleratorError

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # heartbeat storage outside Study.optimize
            trial = self.study.ask()
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
        held = self.claims.claim("plan", plan.hash, trial.number)
        if held is not None:
            owner = self._trial(held.trial)
            if owner is not None and owner.state == TrialState.COMPLETE and owner.user_attrs.get("evaluated"):
                evaluation = owner.user_attrs["eval"]
                self._tell(trial, trial_id, objective_values(spec, report, evaluation),
                           attrs={**attrs, "evaluated": True, "eval": evaluation, "fidelity": owner.user_attrs.get(
                               "fidelity"), "duplicate_of": owner.number, "timings_s": timings})
                return "complete"
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
        self.failures_in_a_row = 0
        if job.kind == "full":
            self.heartbeat.full_keys.discard(str(job.number))
            self.study.set_user_attr(f"{FULL_PREFIX}{job.number}", {
                **evaluation["full"], "worker": evaluation["worker"], "timings_s": evaluation["timings_s"]})
            return
        timings = {**job.timings, **evaluation["timings_s"]}
        self._tell(job.trial, job.trial_id, objective_values(self.spec, job.report, evaluation), attrs={
            "evaluated": True, "eval": evaluation, "fidelity": "+".join(self.fidelities),
            "worker": evaluation["worker"], "timings_s": timings})

    def _failed(self, job: Job, error: str) -> None:
        if job.kind == "full":
            self.heartbeat.full_keys.discard(str(job.number))
            self.claims.release("full", str(job.number))
            log.error("full evaluation of trial %d failed: %s", job.number, error)
        else:
            self._tell(job.trial, job.trial_id, state=TrialState.FAIL, attrs={"error": error})
            self.claims.release("plan", job.plan_hash)
            log.error("trial %d failed: %s", job.number, error)
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise EvaluationError(f"{self.failures_in_a_row} evaluations in a row failed; last: {error}")

    # ------------------------------------------------------------------ promotion
    def _promote_if_due(self, trials, complete: int) -> None:
        every = self.spec.promotion.every
        if every and complete - self.promoted_at >= every and "full" not in self.fidelities:
            self.promoted_at = complete - complete % every
            self.promote(final=False, trials=trials)

    def promote(self, final: bool, trials=None) -> None:
        """Evaluate the Pareto trials without a full result on the full tasks; with ``final``, wait for them."""
        import ray

        from dse.pareto import study_front

        if "full" in self.fidelities or not self.model_objective:
            return
        front = study_front(self.study, trials)
        have = full_results(self.study)
        for trial in front:
            if trial.number in have or not self._claim_full(trial.number):
                continue
            actor = self._idle_actor() if final else (self.idle.pop() if self.idle else None)
            if actor is None:
                self.claims.release("full", str(trial.number))
                break
            self.heartbeat.full_keys.add(str(trial.number))
            ref = actor.evaluate.remote(json.dumps(self.records.plan(trial)), ("full",))
            self.jobs[ref] = Job("full", actor, number=trial.number)
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

    # ------------------------------------------------------------------ bookkeeping
    def _tell(self, trial, trial_id: int, values=None, state=None, attrs: dict | None = None) -> None:
        for key, value in (attrs or {}).items():
            trial.set_user_attr(key, value)
        self.study.tell(trial, values, state=state)
        self._untrack(trial_id)

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

    def _show(self, trials) -> None:
        from dse.pareto import is_feasible, study_front, study_hypervolume

        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        feasible = sum(is_feasible(t) for t in complete)
        self.bar.n = min(len(complete), self.bar.total)
        self.bar.set_postfix_str(
            f"feasible {feasible}/{len(complete)}, pareto {len(study_front(self.study, complete))}, "
            f"hv {study_hypervolume(self.study, complete):.3f}, running {len(self.jobs)}", refresh=False)
        self.bar.refresh()

    def _abandon(self) -> None:
        """On the way out (error, Ctrl-C): our unfinished trials are failed and re-enqueued."""
        retry = retry_callback()
        for job in self.jobs.values():
            if job.kind == "trial":
                self._tell(job.trial, job.trial_id, state=TrialState.FAIL, attrs={"error": "driver stopped"})
                self.claims.release("plan", job.plan_hash)
                retry(self.study, self.storage.get_trial(job.trial_id))
            else:
                self.claims.release("full", str(job.number))
        self.jobs.clear()
