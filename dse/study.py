"""A study from its spec: validate it against the model (:func:`prepare`), open or create its storage and
study (:func:`open_study`), and run it to its budget (:func:`run_study`) with the driver loop of
:mod:`dse.driver` on the evaluator actors of :mod:`dse.pool`.

The study's database is the single source of truth: every trial's plan and per-layer hardware report are
its records (:mod:`dse.records`, a table beside Optuna's), its scalars (hardware metrics, plan hash and
summary, evaluation, timings, worker, fidelity) are trial user attributes (JSON), the validated spec is a
study user attribute, and several drivers (on several machines) may run the same study at once.

Multi-fidelity results: every ``promotion.every`` completed trials and at the end, the current Pareto set's
trials without a full-fidelity result are evaluated on the spec's lm-eval tasks; the result is stored as the
study user attribute ``full:<trial number>`` (Optuna freezes a finished trial's attributes) and read back
with :func:`full_results`.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from dse.arch import PlanMismatch, Workload, check_plan
from dse.hardware import HardwareSpace
from dse.plan import BlockPlan, LayerPlan, ModelPlan
from dse.space import Unit, build_units
from dse.spec import ACCURACY, PROXY_KL, SpecError, StudySpec

log = logging.getLogger(__name__)

SPEC_ATTR = "spec"
FULL_PREFIX = "full:"
MAX_RETRIES = 3
"""How often a plan whose trial went stale is re-enqueued."""


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
        resolve_tasks([t.name for t in spec.tasks], seed=spec.task_seed, include_paths=spec.task_paths)
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
    if spec.needs_model:
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
            heartbeat_stale_trial_callback=retry_callback(),
            engine_kwargs={"pool_pre_ping": True})


def retry_callback():
    """Optuna's callback that re-enqueues a failed trial's parameters (at most MAX_RETRIES times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def open_study(setup: Setup, storage=None) -> optuna.Study:
    """Create the study (with its warm starts) or load it; refuses a stored study whose spec differs from this one
    in what a trial means (:mod:`dse.identity`). Safe when several drivers start at once: one creates, the others
    load. Either way this run's changeable fields are recorded (:func:`dse.identity.run_record`). Run it with the
    spec's user devices known (:meth:`dse.hardware.HardwareSpace.active`)."""
    from dse.identity import run_record

    spec = setup.spec
    storage = storage or make_storage(spec)
    try:
        study = optuna.create_study(study_name=spec.study, storage=storage, sampler=study_sampler(setup),
                                    directions=spec.directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.study, storage=storage)
        check_resume(setup, study)
        # A resumed (or second) driver continues the seed sequence instead of repeating the first
        # proposals, which are already in the study: seed + number of trials so far (deterministic).
        study.sampler = study_sampler(setup, offset=len(study.get_trials(deepcopy=False)))
        study.set_user_attr(*run_record(spec))
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
    study.set_user_attr(*run_record(spec))
    study.set_user_attr(SPEC_ATTR, spec.to_dict())  # last: a study with its spec is ready for other drivers
    return study


def check_resume(setup: Setup, study: optuna.Study) -> None:
    """Refuse to resume ``study`` with ``setup``'s spec when they differ in what a trial means (one SpecError
    line naming the fields, :func:`dse.identity.check_identity`); a study stored without a spec is not checked."""
    from dse.identity import check_identity

    stored = _stored_spec(study)
    if stored:
        check_identity(stored, study.user_attrs, setup.spec, setup.workload.to_dict())
    else:
        log.warning("study '%s' has no stored spec to compare with (written by an old version)", study.study_name)


def check_storage(setup: Setup) -> None:
    """Before any work: the storage answers and can take the study (:func:`dse.reader.storage_to_create`), and a
    study of this name there has this spec (:func:`check_resume`). One ``storage: ...`` line (password masked)
    otherwise; creates nothing."""
    from dse.reader import StorageError, storage_to_create

    spec = setup.spec
    try:
        reader = storage_to_create(spec.storage)
    except StorageError as err:
        raise SpecError("storage", str(err)) from None
    if reader is None:
        return
    try:
        if spec.study in {s.study_name for s in reader.get_all_studies()}:
            check_resume(setup, optuna.load_study(study_name=spec.study, storage=reader))
    finally:
        reader.engine.dispose()


def check_evaluation(spec: StudySpec) -> None:
    """Before any work of a study with a model objective: every task loads here with its data and reports its
    chosen metric (:func:`evaluators.tasks.reported_metrics`), and the model's weights files match its config
    (:func:`evaluators.models.check_weights`), the spec's ``task_paths`` known. One SpecError line naming
    ``tasks[i].name``, ``tasks[i].metric`` or ``model``."""
    from evaluators.models import check_weights
    from evaluators.tasks import TaskDataError, reported_metrics

    for i, task in enumerate(spec.tasks):
        try:
            metrics = reported_metrics(task.name, spec.task_seed, spec.task_paths)
        except TaskDataError as err:
            raise SpecError(f"tasks[{i}].name", str(err)) from None
        if task.metric not in metrics:
            raise SpecError(f"tasks[{i}].metric", f"'{task.metric}' is not a metric lm-eval reports for "
                                                  f"{task.name}; it reports {', '.join(metrics)}")
    check_weights(spec.model)


def check_feasible(spec: StudySpec, study: optuna.Study) -> None:
    """After the run: when no completed trial met the constraints, one SpecError line naming each constraint no
    plan met and the best value seen (``constraints: no plan of 10 met 'decode_tokens_per_s >= 1e+06' (best
    seen 312.4)``), or the device no plan fit."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials or any(max(t.user_attrs.get("constraints", {"": 0}).values()) <= 0 for t in trials):
        return
    unmet = []
    for c in spec.constraints:
        if all(t.user_attrs["constraints"].get(str(c), 0) > 0 for t in trials):
            seen = [t.user_attrs["hw_metrics"][c.metric] for t in trials if c.metric in t.user_attrs["hw_metrics"]]
            best = (max if c.op == ">=" else min)(seen) if seen else float("nan")
            unmet.append(f"'{c}' (best seen {best:.4g})")
    if unmet:
        raise SpecError("constraints", f"no plan of {len(trials)} met {' or '.join(unmet)}; relax the constraint "
                                       "or change the space or the hardware")
    if all(t.user_attrs["constraints"].get("fits", 0) > 0 for t in trials):
        least = min(t.user_attrs["constraints"]["fits"] for t in trials)
        devices = " | ".join(map(str, spec.hardware_space.device_names()))
        raise SpecError("hardware.device", f"no plan of {len(trials)} fits {devices} (the closest needs "
                                           f"{least:.1%} more than the device has)")
    together = ", ".join([*map(str, spec.constraints), "fitting the device"])
    raise SpecError("constraints", f"no plan of {len(trials)} met all of {together} at once")


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


def run_study(spec: StudySpec, progress: bool = True) -> optuna.Study:
    """Run the study to ``spec.trials`` completed trials (then the final promotion); returns the study. Every check
    that can run before work does, in this order: the spec against the model config and task names
    (:func:`prepare`), the storage and the stored study's spec (:func:`check_storage`), the tasks' data and
    metrics and the model's weights (:func:`check_evaluation`, when an objective needs the model); only then
    does Ray start (its address checked before the study is created: an unreachable one leaves no study) and
    the study get created. The spec's user devices (``hardware.devices_file``) are known while it runs; a
    hardware-only study starts no Ray. A run whose every trial broke a constraint ends in
    :func:`check_feasible`'s one line."""
    from tqdm import tqdm

    from dse.claims import Claims
    from dse.driver import Driver
    from dse.pool import kill_actors, start_actors

    setup = prepare(spec)
    check_storage(setup)
    if spec.needs_model:
        check_evaluation(spec)
    actors = start_actors(spec) if spec.needs_model else []
    with setup.hardware.active():
        try:
            storage = make_storage(spec)
            study = open_study(setup, storage)
        except BaseException:
            kill_actors(actors)
            raise
        claims = Claims(spec.storage, study.user_attrs.get("uid", spec.study))
        bar = tqdm(total=spec.trials, desc=spec.study, unit="trial", disable=not progress)
        try:
            Driver(setup, study, storage, actors, claims, bar).run()
        finally:
            bar.close()
            claims.close()
            kill_actors(actors)
    check_feasible(spec, study)
    return study
