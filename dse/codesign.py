"""The co-design sampler: the plan from the spec's sampler, the accelerator chosen by the cost model for that plan.

Accuracy depends on the plan, not on the clock, the engine budgets or which layers are resident, so once a
trial's plan parameters are sampled the cost model can try every design for that plan in milliseconds,
without an evaluation. :class:`CoDesignSampler` wraps the spec's sampler (NSGA-II, TPE, ...):

* the plan's parameters, and the searched fields that change what the accuracy evaluation would have to
  measure (:data:`ACCURACY_FIELDS`: KV-cache bits and the attention window, which the evaluators do not
  apply), come from the wrapped sampler as before;
* every other searched field (``hw.<field>``) is chosen from all the combinations of its choices (at most
  :data:`MAX_DESIGNS`, the reference design always among them) with ``hwcost.estimate_batch`` on the
  trial's plan: among the designs that fit and meet the spec's hardware constraints, and that weakly
  dominate the reference design (every searched field at its first choice) on the hardware objectives when
  it is feasible, the non-dominated ones; one of them by a Tchebycheff scalarisation with random weights
  (seeded by the sampler seed and the trial number), so trials spread over the hardware trade-off. With no
  feasible design the least violating one is chosen (the trial is then screened out as usual).

The choice is a parameter of the same Optuna trial (stored, resumed and exported like any other); the
driver costs and screens the pair as before.
"""

from __future__ import annotations

import itertools

import numpy as np
from optuna.samplers import BaseSampler

from dse.pareto import losses, nondominated
from dse.space import HW_PREFIX, plan_from_params

ACCURACY_FIELDS = ("kv_bits", "attention_window")
"""Searched fields left to the wrapped sampler: they would change the model the accuracy evaluation sees."""
MAX_DESIGNS = 1024
"""At most this many designs are tried per plan (a seeded random subset plus the reference beyond it)."""


class CoDesignSampler(BaseSampler):
    """Wraps ``base``: plan parameters (and :data:`ACCURACY_FIELDS`) from it, the other ``hw.*`` parameters
    chosen by the cost model for the trial's plan (module docstring). ``setup`` is the driver's
    :class:`~dse.study.Setup` (spec, workload, units, hardware space)."""

    def __init__(self, base: BaseSampler, setup, seed: int):
        hardware = setup.hardware
        self._base, self._setup, self._seed = base, setup, seed
        self._free = [name for name in hardware.searched if name not in ACCURACY_FIELDS]
        combos = list(itertools.product(*(range(len(hardware.searched[n])) for n in self._free)))
        if len(combos) > MAX_DESIGNS:
            rng = np.random.default_rng(seed)
            rest = rng.choice(np.arange(1, len(combos)), size=MAX_DESIGNS - 1, replace=False)
            combos = [combos[0]] + [combos[i] for i in sorted(rest)]
        self._combos = combos  # combos[0] is the reference (every field's first choice)
        self._designs: dict[tuple, list] = {}
        self._chosen: dict[int, dict] = {}

    # -------------------------------------------------------------- the BaseSampler interface, delegated
    def infer_relative_search_space(self, study, trial):
        space = self._base.infer_relative_search_space(study, trial)
        return {k: v for k, v in space.items() if not self._chosen_here(k)}

    def sample_relative(self, study, trial, search_space):
        return self._base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if self._chosen_here(param_name):
            if trial.number not in self._chosen:
                self._chosen[trial.number] = self.choose(trial.params, trial.number)
            return self._chosen[trial.number][param_name]
        return self._base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._chosen.pop(trial.number, None)
        self._base.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self._base.reseed_rng()

    def _chosen_here(self, param_name: str) -> bool:
        return param_name.startswith(HW_PREFIX) and param_name[len(HW_PREFIX):] in self._free

    # -------------------------------------------------------------- the choice
    def designs(self, fixed: dict) -> list:
        """The accelerators of every combination of the chosen fields, with ``fixed`` (the accuracy fields'
        raw choices) set; cached per ``fixed``."""
        key = tuple(sorted((k, repr(v)) for k, v in fixed.items()))
        if key not in self._designs:
            hardware = self._setup.hardware
            self._designs[key] = [
                hardware.build({**fixed, **{name: hardware.searched[name][i] for name, i in zip(self._free, combo)}})
                for combo in self._combos]
        return self._designs[key]

    def choose(self, params: dict, number: int) -> dict:
        """The ``hw.*`` values of the chosen fields for the plan ``params`` describe (module docstring)."""
        from hwcost import PlanBatch, estimate_batch

        setup, hardware = self._setup, self._setup.hardware
        spec = setup.spec
        fixed = {name: hardware.decode(name, params[HW_PREFIX + name]) for name in hardware.searched
                 if name not in self._free and HW_PREFIX + name in params}
        designs = self.designs(fixed)
        plan = plan_from_params(params, setup.units, spec.space.mlgru_blocks)
        one = PlanBatch.from_plans([plan], setup.workload)
        K = len(designs)
        batch = PlanBatch(one.workload, *(np.repeat(a, K, axis=0) for a in
                                          (one.kernel, one.n, one.m, one.group, one.mlgru, one.zero)))
        with hardware.active():
            report = estimate_batch(batch, designs)
        violation = np.maximum(report.constraint_violation, 0.0)
        for c in spec.constraints:
            violation = violation + np.maximum([c.violation(float(v)) for v in report.metric(c.metric)], 0.0)
        hw_objectives = [o for o in spec.objectives if o.name not in ("accuracy", "proxy_kl")]
        loss = losses(np.stack([report.metric(o.name) for o in hw_objectives], axis=1) if hw_objectives
                      else np.zeros((K, 0)), [o.direction for o in hw_objectives])
        feasible = violation <= 0
        if not feasible.any():
            pick = int(np.argmin(violation))
        elif not hw_objectives:
            pick = 0 if feasible[0] else int(np.flatnonzero(feasible)[0])
        else:
            candidates = feasible.copy()
            if feasible[0]:
                candidates &= np.all(loss <= loss[0], axis=1)
            index = np.flatnonzero(candidates)
            front = index[nondominated(loss[index])]
            lo, hi = loss[front].min(0), loss[front].max(0)
            scaled = (loss[front] - lo) / np.where(hi > lo, hi - lo, 1.0)
            weights = np.random.default_rng([self._seed, number]).dirichlet(np.ones(len(hw_objectives)))
            pick = int(front[np.argmin((scaled * weights).max(1))])
        combo = self._combos[pick]
        return {HW_PREFIX + name: hardware.encoded(name)[i] for name, i in zip(self._free, combo)}


def codesign_sampler(base: BaseSampler, setup, seed: int) -> BaseSampler:
    """``base`` wrapped in a :class:`CoDesignSampler` when the spec searches accelerator fields the cost model
    can choose, else ``base`` itself."""
    hardware = setup.hardware
    if hardware is None or not any(name not in ACCURACY_FIELDS for name in hardware.searched):
        return base
    return CoDesignSampler(base, setup, seed)

