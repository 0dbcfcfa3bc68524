"""The driver: ask Optuna for plans, screen them on the cost model, evaluate the rest on Ray actors, tell.

One call of :func:`run_study` creates (or resumes) the study named in the spec
and runs until the study holds ``spec.trials`` completed trials. The Optuna
storage is the single source of truth: every trial's plan, hardware report,
evaluation and timings are trial user attributes (JSON), and the validated spec
is a study user attribute.

Plans that violate a hardware constraint (do not fit the device, or break a
user constraint) are told at once with ``accuracy`` 0 and their named
constraint values (``trial.constraints``), without an accuracy evaluation (``user_attrs['evaluated'] = False``).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass

import optuna

from dse.space import Unit, build_units, suggest_plan
from dse.spec import ACCURACY, StudySpec, SpecError

log = logging.getLogger(__name__)

SPEC_ATTR = "spec"
MAX_FAILURES_IN_A_ROW = 3


class EvaluationError(RuntimeError):
    """Evaluations keep failing (e.g. a task metric lm-eval does not report); the message is one line."""


@dataclass
class Setup:
    """Everything the driver derives from the spec before it touches storage."""

    spec: StudySpec
    workload: object
    accelerator: object
    units: list[Unit]


def prepare(spec: StudySpec) -> Setup:
    """Validate the spec against the model and task registry; raises SpecError, writes nothing."""
    from evaluators.models import ModelError, load_config
    from evaluators.tasks import resolve_tasks
    from hwcost import Accelerator, Workload

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
    check_nm_widths(spec, {layer.name: layer.in_features for layer in layers}, units)
    for i, block in enumerate(spec.space.mlgru_blocks):
        if block >= workload.num_layers:
            raise SpecError(f"space.mlgru_blocks[{i}]", f"block {block} is not in the model (blocks 0.."
                                                         f"{workload.num_layers - 1})")
    return Setup(spec, workload, Accelerator.from_dict(spec.hardware), units)


def check_nm_widths(spec: StudySpec, in_features: dict[str, int], units: list[Unit]) -> None:
    """Every N:M pattern a group allows must have M dividing the input width of each layer it targets."""
    for unit in units:
        i = spec.space.groups.index(unit.group)
        for j, sparsity in enumerate(unit.group.sparsity):
            for name in unit.layers:
                if sparsity is not None and in_features[name] % sparsity.m:
                    raise SpecError(f"space.groups[{i}].sparsity[{j}]",
                                    f"M={sparsity.m} does not divide in_features {in_features[name]} of {name}")


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded. Constraints reach it through ``trial.set_constraint`` (Optuna >= 5)."""
    seed = spec.sampler.seed
    name = spec.sampler.name
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=spec.sampler.population, seed=seed)
    if name == "nsga3":
        return optuna.samplers.NSGAIIISampler(population_size=spec.sampler.population, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(setup: Setup) -> optuna.Study:
    """Create the study or load it; refuses a stored study whose objectives differ from the spec."""
    spec = setup.spec
    storage = optuna.storages.RDBStorage(spec.storage)
    sampler = make_sampler(spec)
    try:
        existing = optuna.load_study(study_name=spec.study, storage=storage, sampler=sampler)
    except KeyError:
        existing = None
    if existing is not None:
        stored = existing.user_attrs.get(SPEC_ATTR, {})
        stored_objectives = [o["name"] for o in stored.get("objectives", [])]
        if stored_objectives != [o.name for o in spec.objectives]:
            raise SpecError("objectives", f"study '{spec.study}' exists in {spec.storage_display} with objectives "
                                          f"{stored_objectives}; use another study name")
        return existing
    study = optuna.create_study(study_name=spec.study, storage=storage, sampler=sampler,
                                directions=spec.directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in spec.objectives])
    study.set_user_attr(SPEC_ATTR, spec.to_dict())
    study.set_user_attr("model", spec.model)
    study.set_user_attr("device", spec.hardware["device"])
    study.set_user_attr("workload", setup.workload.to_dict())
    return study


def objective_values(spec: StudySpec, hw_report, accuracy: float) -> list[float]:
    return [accuracy if o.name == ACCURACY else float(hw_report.metric(o.name)) for o in spec.objectives]


def screen(spec: StudySpec, hw_report) -> dict[str, float]:
    """Named constraint values (<= 0 satisfied): ``fits`` the device, then each user constraint."""
    values = {"fits": float(hw_report.constraint_violation)}
    values.update({str(c): c.violation(float(hw_report.metric(c.metric))) for c in spec.constraints})
    return values


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def run_study(spec: StudySpec, progress: bool = True) -> optuna.Study:
    """Run the study to ``spec.trials`` completed trials; returns the study."""
    import ray
    from tqdm import tqdm

    from dse.workers import WORKER_ENV, EvaluatorActor
    from hwcost import estimate

    setup = prepare(spec)
    study = open_study(setup)
    done = completed(study)
    if done >= spec.trials:
        log.warning("study '%s' already has %d completed trials (budget %d)", spec.study, done, spec.trials)
        return study

    address = spec.ray_address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, spec.workers * spec.threads_per_worker),
                     include_dashboard=False, log_to_driver=False)
    actors = [
        EvaluatorActor.options(num_cpus=spec.threads_per_worker, runtime_env={"env_vars": WORKER_ENV}).remote(
            spec.model, spec.tasks, spec.task_seed, spec.batch_size, spec.threads_per_worker, spec.compression)
        for _ in range(spec.workers)
    ]
    idle = list(actors)
    running: dict = {}  # ObjectRef -> (trial, actor, hardware report, cost-model seconds)
    failures_in_a_row = 0
    bar = tqdm(total=spec.trials, initial=done, desc=spec.study, unit="trial", disable=not progress)
    try:
        while done < spec.trials:
            while idle and done + len(running) < spec.trials:
                trial = study.ask()
                plan = suggest_plan(trial, setup.units, spec.space.mlgru_blocks)
                started = time.perf_counter()
                report = estimate(plan, setup.workload, setup.accelerator)
                cost_s = time.perf_counter() - started
                constraints = screen(spec, report)
                trial.set_user_attr("plan", plan.to_dict())
                trial.set_user_attr("plan_hash", plan.hash)
                trial.set_user_attr("plan_summary", plan.summary())
                trial.set_user_attr("hw", report.to_dict())
                for key, value in constraints.items():
                    trial.set_constraint(key, value)
                if max(constraints.values()) > 0:
                    trial.set_user_attr("evaluated", False)
                    trial.set_user_attr("timings_s", {"hwcost": cost_s})
                    study.tell(trial, objective_values(spec, report, 0.0))
                    done += 1
                    _progress(bar, study)
                    continue
                actor = idle.pop()
                ref = actor.evaluate.remote(plan.to_json())
                running[ref] = (trial, actor, report, cost_s)
            if not running:
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            trial, actor, report, cost_s = running.pop(ready[0])
            idle.append(actor)
            try:
                evaluation = ray.get(ready[0])
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
                trial.set_user_attr("error", str(err).strip().splitlines()[-1][:500])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.error("trial %d failed: %s", trial.number, trial.user_attrs["error"])
                failures_in_a_row += 1
                if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    raise EvaluationError(f"{failures_in_a_row} evaluations in a row failed; "
                                          f"last: {trial.user_attrs['error']}")
                continue
            failures_in_a_row = 0
            trial.set_user_attr("evaluated", True)
            trial.set_user_attr("eval", evaluation)
            trial.set_user_attr("worker", evaluation["worker"])
            trial.set_user_attr("timings_s", {"hwcost": cost_s, **evaluation["timings_s"]})
            study.tell(trial, objective_values(spec, report, evaluation["accuracy"]))
            done += 1
            _progress(bar, study)
    finally:
        bar.close()
        for ref, (trial, *_rest) in running.items():
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        for actor in actors:
            ray.kill(actor)
    return study


def _progress(bar, study: optuna.Study) -> None:
    """One more completed trial: advance the bar and show evaluated / screened counts and the Pareto size."""
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    evaluated = sum(1 for t in trials if t.user_attrs.get("evaluated"))
    bar.set_postfix(evaluated=evaluated, screened=len(trials) - evaluated, pareto=len(study.best_trials),
                    refresh=False)
    bar.update(1)
