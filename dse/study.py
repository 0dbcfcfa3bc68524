"""The driver: ask Optuna for plans, screen them on the cost model, evaluate the rest on Ray actors, tell.

:func:`run_study` creates (or resumes) the study named in the spec and runs until it holds
``spec.trials`` completed trials. The study's database is the single source of truth: every
trial's plan and per-layer hardware report are its records (:mod:`dse.records`, a table beside
Optuna's), its scalars (hardware metrics, plan hash and summary, evaluation, timings, worker,
fidelity) are trial user attributes (JSON), the validated spec is a study user attribute, and
several drivers (on several machines) may run the same study at once.

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

Multi-fidelity: every ``promotion.every`` completed trials and at the end, the current Pareto
set's trials without a full-fidelity result are evaluated on the spec's lm-eval tasks; the
result is stored as the study user attribute ``full:<trial number>`` (Optuna freezes a
finished trial's attributes) and read back with :func:`full_results`.

Persistence: the driver records a heartbeat for each trial it runs (Optuna's heartbeat, every
``heartbeat_s``); trials whose heartbeat is older than three intervals (a killed driver) are
failed and their parameters re-enqueued (``RetryFailedTrialCallback``), by any driver of the
study. The budget counts completed trials; trials in flight anywhere count against it, so the
study ends with exactly ``spec.trials`` completed trials.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from dse.arch import PlanMismatch, Workload, check_plan
from dse.plan import BlockPlan, LayerPlan, ModelPlan
from dse.hardware import HardwareSpace, searched_hardware
from dse.space import Unit, build_units, suggest_accelerator, suggest_plan
from dse.spec import ACCURACY, MODEL_OBJECTIVES, PROXY_KL, SpecError, StudySpec

log = logging.getLogger(__name__)

SPEC_ATTR = "spec"
FULL_PREFIX = "full:"
MAX_FAILURES_IN_A_ROW = 3
MAX_RETRIES = 3
"""How often a plan whose trial went stale is re-enqueued."""


class EvaluationError(RuntimeError):
    """Evaluations keep failing (e.g. a task metric lm-eval does not report); the message is one line."""


@dataclass
class Setup:
    """Everything the driver derives from the spec before it touches storage."""

    spec: StudySpec
    workload: object
    accelerator: object
    """The accelerator of every field's first choice: the study's accelerator when none is searched."""
    units: list[Unit]
    hardware: HardwareSpace | None = None
    """The spec's ``hardware:`` block (fixed and searched fields, user devices)."""


def prepare(spec: StudySpec) -> Setup:
    """Validate the spec against the model and task registry; raises SpecError, writes nothing."""
    from evaluators.models import ModelError, load_config
    from evaluators.tasks import resolve_tasks

    try:
        config = load_config(spec.model)
    except ModelError as err:
        raise SpecError("", str(err)) from None
    try:
        workload = Workload.from_hf_config(config)
    except ValueError as err:
        raise SpecError("model", str(err).splitlines()[0]) from None
    try:
        resolve_tasks([t.name for t in spec.tasks], seed=spec.task_seed)
    except ValueError as err:
        message = str(err).splitlines()[0]
        raise SpecError("" if message.startswith("tasks") else "tasks", message) from None
    layers = workload.linear_layers()
    units = build_units(spec.space, [layer.name for layer in layers])
    for i, block in enumerate(spec.space.mlgru_blocks):
        if block >= workload.num_layers or workload.token_mixer != "attention":
            raise SpecError(f"space.mlgru_blocks[{i}]", f"block {block} is not in the model (blocks 0.."
                                                         f"{workload.num_layers - 1})" if block >= workload.num_layers
                            else f"model_type {workload.model_type} has no attention to replace")
    check_nm_widths(spec, workload, units)
    hardware = spec.hardware_space
    if any(o.name in MODEL_OBJECTIVES for o in spec.objectives):
        unmodelled = [f"{name} {values}" for name, values in (
            ("kv_bits", [v for v in hardware.choices("kv_bits") if v != 16]),
            ("attention_window", [v for v in hardware.choices("attention_window") if v is not None])) if values]
        if unmodelled:
            log.warning("hardware %s: the accuracy evaluation keeps an FP16 KV cache and full attention, so only "
                        "the cost model sees these values", ", ".join(unmodelled))
    return Setup(spec, workload, hardware.first(), units, hardware)


def check_nm_widths(spec: StudySpec, workload: Workload, units: list[Unit]) -> None:
    """Every N:M pattern a group allows must fit every layer it targets, as :func:`dse.arch.check_plan` sees it:
    M divides the layer's input width, and that of the MLGRU projections inheriting it in ``space.mlgru_blocks``."""
    mlgru = tuple(BlockPlan(b, "mlgru") for b in spec.space.mlgru_blocks)
    for unit in units:
        i = spec.space.groups.index(unit.group)
        for j, sparsity in enumerate(unit.group.sparsity):
            if sparsity is None:
                continue
            for blocks in ((), mlgru) if mlgru else ((),):
                plan = ModelPlan(tuple(LayerPlan(name, sparsity) for name in unit.layers), blocks)
                try:
                    check_plan(plan, workload)
                except PlanMismatch as err:
                    raise SpecError(f"space.groups[{i}].sparsity[{j}]", err.problem) from None


def make_sampler(spec: StudySpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded with ``sampler.seed + offset``. Constraints reach every sampler through
    ``trial.set_constraint`` (Optuna 5 replaced the samplers' ``constraints_func`` argument by it)."""
    seed = spec.sampler.seed + offset
    name = spec.sampler.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=spec.sampler.population, seed=seed)
        if name == "nsga3":
            return optuna.samplers.NSGAIIISampler(population_size=spec.sampler.population, seed=seed)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def study_sampler(setup: Setup, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler (:func:`make_sampler`), wrapped in the co-design sampler when the spec searches
    accelerator fields (:mod:`dse.codesign`: the cost model picks the design for each sampled plan)."""
    from dse.codesign import codesign_sampler

    return codesign_sampler(make_sampler(setup.spec, offset), setup, setup.spec.sampler.seed + offset)


def make_storage(spec: StudySpec) -> optuna.storages.RDBStorage:
    """The spec's storage with Optuna's trial heartbeat; stale trials are failed and re-enqueued."""
    with warnings.catch_warnings():  # the heartbeat options are experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            spec.storage, heartbeat_interval=max(1, round(spec.heartbeat_s)),
            grace_period=max(3, round(3 * spec.heartbeat_s)),
            heartbeat_stale_trial_callback=_retry(),
            engine_kwargs={"pool_pre_ping": True})


def _retry():
    """Optuna's callback that re-enqueues a failed trial's parameters (at most MAX_RETRIES times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def open_study(setup: Setup, storage=None) -> optuna.Study:
    """Create the study (with its warm starts) or load it; refuses a stored study whose objectives or searched
    accelerator fields differ from the spec's. Safe when several drivers start at once: one creates, the others
    load. Run it with the spec's user devices known (:meth:`dse.hardware.HardwareSpace.active`)."""
    spec = setup.spec
    storage = storage or make_storage(spec)
    try:
        study = optuna.create_study(study_name=spec.study, storage=storage, sampler=study_sampler(setup),
                                    directions=spec.directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.study, storage=storage)
        # A resumed (or second) driver continues the seed sequence instead of repeating the first
        # proposals, which are already in the study: seed + number of trials so far (deterministic).
        study.sampler = study_sampler(setup, offset=len(study.get_trials(deepcopy=False)))
        stored = _stored_spec(study)
        stored_objectives = [o["name"] for o in stored.get("objectives", [])]
        if stored_objectives != [o.name for o in spec.objectives]:
            raise SpecError("objectives", f"study '{spec.study}' exists in {spec.storage_display} with objectives "
                                          f"{stored_objectives}; use another study name") from None
        stored_searched, searched = searched_hardware(stored.get("hardware", {})), searched_hardware(spec.hardware)
        if stored and stored_searched != searched:
            raise SpecError("hardware", f"study '{spec.study}' exists in {spec.storage_display} searching "
                                        f"{_searched_text(stored_searched)}; this spec searches "
                                        f"{_searched_text(searched)}; use another study name") from None
        return study
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in spec.objectives])
    study.set_user_attr("uid", uuid.uuid4().hex)  # names claims (a later study of the same name is another)
    study.set_user_attr("model", spec.model)
    study.set_user_attr("device", spec.hardware["device"])
    study.set_user_attr("workload", setup.workload.to_dict())
    hardware = setup.hardware or spec.hardware_space
    if hardware.user_device_entries():  # what `dse export` writes beside a trial's accelerator on such a board
        study.set_user_attr("devices", hardware.user_device_entries())
    for ws in _warm_starts(setup):  # their hw.* parameters come from the (co-design) sampler
        study.enqueue_trial(ws.params, user_attrs={"warm_start": ws.label}, skip_if_exists=True)
    study.set_user_attr(SPEC_ATTR, spec.to_dict())  # last: a study with its spec is ready for other drivers
    return study


def _searched_text(searched: dict) -> str:
    return "; ".join(f"{k} {v}" for k, v in searched.items()) or "no accelerator field"


def _warm_starts(setup: Setup):
    from dse.warmstart import warm_starts

    return warm_starts(setup.spec, setup.units, setup.workload, setup.accelerator)


def _stored_spec(study: optuna.Study, wait_s: float = 30.0) -> dict:
    """The spec attribute of a study another driver may have created a moment ago."""
    deadline = time.monotonic() + wait_s
    while True:
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is not None or time.monotonic() > deadline:
            return stored or {}
        time.sleep(0.2)


def objective_values(spec: StudySpec, hw_report, evaluation: dict | None) -> list[float]:
    """Objective values of a trial; without an evaluation (screened out) the model objective is its worst
    value (accuracy 0, proxy KL infinite), so no sampler mistakes it for a good plan."""
    out = []
    for o in spec.objectives:
        if o.name == PROXY_KL:
            out.append(float(evaluation["proxy"]["kl"]) if evaluation else float("inf"))
        elif o.name == ACCURACY:
            out.append(float(evaluation["full"]["accuracy"]) if evaluation else 0.0)
        else:
            out.append(float(hw_report.metric(o.name)))
    return out


def screen(spec: StudySpec, hw_report) -> dict[str, float]:
    """Named constraint values (<= 0 satisfied): ``fits`` the device, then each user constraint."""
    values = {"fits": float(hw_report.constraint_violation)}
    values.update({str(c): c.violation(float(hw_report.metric(c.metric))) for c in spec.constraints})
    return values


def trial_record(plan, report, constraints: dict[str, float], accelerator: dict | None = None) -> dict:
    """The user attributes every trial gets before its evaluation: the plan's hash and label counts, the
    hardware report's scalar metrics, the named constraint values and, when the study searches accelerator
    fields, their values (``accelerator``: the searched fields only; the plan, the whole accelerator and the
    report themselves are the trial's records, :func:`trial_records`)."""
    from hwcost import HwReport

    out = {"plan_hash": plan.hash, "plan_summary": plan.summary(),
           "hw_metrics": HwReport.metrics_of(report.to_dict()), "constraints": constraints}
    if accelerator:
        out["accelerator"] = accelerator
    return out


def trial_records(plan, report, accelerator=None) -> dict:
    """A trial's records (:mod:`dse.records`): the plan, the whole hardware report and (given) the accelerator
    it was costed on."""
    out = {"plan": plan.to_dict(), "hw": report.to_dict()}
    if accelerator is not None:
        out["accelerator"] = accelerator.to_dict()
    return out


def full_results(study: optuna.Study, trials=None) -> dict[int, dict]:
    """Full-fidelity results by trial number: promotions (study attributes) and trials evaluated in full
    (among ``trials``, default all of the study's)."""
    out = {int(k[len(FULL_PREFIX):]): v for k, v in study.user_attrs.items() if k.startswith(FULL_PREFIX)}
    for t in (trials if trials is not None else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))):
        full = t.user_attrs.get("eval", {}).get("full")
        if full and t.number not in out and t.state == TrialState.COMPLETE:
            out[t.number] = full
    return out


def full_result(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict | None:
    """One trial's full-fidelity result (its promotion, or its own full evaluation), or None."""
    return study.user_attrs.get(f"{FULL_PREFIX}{trial.number}") or trial.user_attrs.get("eval", {}).get("full")


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


# --------------------------------------------------------------------------- the driver


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
        retry = _retry()
        for job in self.jobs.values():
            if job.kind == "trial":
                self._tell(job.trial, job.trial_id, state=TrialState.FAIL, attrs={"error": "driver stopped"})
                self.claims.release("plan", job.plan_hash)
                retry(self.study, self.storage.get_trial(job.trial_id))
            else:
                self.claims.release("full", str(job.number))
        self.jobs.clear()


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


def run_study(spec: StudySpec, progress: bool = True) -> optuna.Study:
    """Run the study to ``spec.trials`` completed trials (then the final promotion); returns the study. The spec's
    user devices (``hardware.devices_file``) are known while it runs; a hardware-only study starts no Ray."""
    from tqdm import tqdm

    from dse.claims import Claims

    setup = prepare(spec)
    # first: a Ray address that does not answer must not leave a new study behind
    actors = start_actors(spec) if any(o.name in MODEL_OBJECTIVES for o in spec.objectives) else []
    with setup.hardware.active():
        try:
            storage = make_storage(spec)
            study = open_study(setup, storage)
        except BaseException:
            _kill(actors)
            raise
        claims = Claims(spec.storage, study.user_attrs.get("uid", spec.study))
        bar = tqdm(total=spec.trials, desc=spec.study, unit="trial", disable=not progress)
        try:
            Driver(setup, study, storage, actors, claims, bar).run()
        finally:
            bar.close()
            claims.close()
            _kill(actors)
    return study


def _kill(actors: list) -> None:
    if actors:
        import ray

        for actor in actors:
            ray.kill(actor)
