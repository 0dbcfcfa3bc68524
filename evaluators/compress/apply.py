"""Applying a :class:`~dse.plan.ModelPlan` to one loaded model, with every result cached on disk.

:class:`PlanApplier` keeps the dense weights of the model it was given, so one loaded model
serves every trial: :meth:`PlanApplier.apply` restores the dense model, installs the MLGRU mixers
the plan asks for (distilled once per block and cached), then sets each named linear layer to its
compressed weight, loaded from the cache when an earlier trial computed the same thing.

The applier first rounds the model to its 16-bit storage width (:mod:`evaluators.compress.storage`): the dense
reference and every plan are measured on the values an export stores.

Calibration (``CompressionSpec.mode``, the spec's ``compression`` section) for the methods that read statistics:

* ``sequential`` (default, as the SparseGPT/GPTQ reference code): the calibration hidden states
  pass through the transformer blocks in order; block ``b``'s statistics are collected in one
  pass over block ``b`` (its own layers uncompressed, its mixer as planned) with blocks ``< b``
  already compressed. A layer's cache key therefore includes the plan of blocks ``< b`` and the
  mixer of block ``b``; ``lm_head`` sees the whole compressed model.
* ``dense``: every layer's statistics come from the dense model (computed once per model and
  cached), so a layer's compressed weight depends only on its own choice and is reused by every
  plan that makes it: the fast mode for large searches.

Calibration-free methods (magnitude, round-to-nearest, absmean ternary) are keyed by the layer
and choice alone. Distilled MLGRUs always learn from the dense model's attention of that block.
MLGRU projections the plan does not name inherit the plan of their attention counterpart
(f <- q_proj, c <- k_proj, g <- v_proj, o <- o_proj; a fused qkv projection gives f, c and g), as
:mod:`dse.arch` describes for every family; names, blocks and the plan check come from there too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import torch

from dse.arch import PlanMismatch, check_plan
from dse.errors import UserError
from dse.plan import LayerPlan, ModelPlan
from evaluators.settings import CompressionSpec
from evaluators.compress import mlgru as mlgru_mod
from evaluators.compress.storage import round_to_storage, storage_dtype
from evaluators.compress.cache import CompressionCache, entry_key, model_fingerprint
from evaluators.compress.calibration import BlockRunner, CalibrationSet, HessianHooks, collect_hessians
from evaluators.compress.methods import compress_layer, needs_calibration
from evaluators.compress.modules import config_workload, linear_modules, weight_of
from evaluators.compress.ternary import BitLinearForward

log = logging.getLogger(__name__)

class PlanApplyError(UserError, ValueError):
    """A plan this model cannot take; the one-line message names the layer or block and the field."""


@dataclass
class ApplyReport:
    """What :meth:`PlanApplier.apply` did: per layer and mixer, where the result came from and its cost."""

    layers: dict[str, dict] = field(default_factory=dict)   # name -> {label, method, source, seconds}
    mixers: dict[int, dict] = field(default_factory=dict)   # block -> {source, mse_initial, mse_final, seconds}
    calibration_s: float = 0.0                               # statistics passes, seconds
    seconds: float = 0.0                                     # whole apply, seconds

    def count(self, source: str) -> int:
        return sum(1 for d in self.layers.values() if d["source"] == source)

    def summary(self) -> dict:
        """Counts and seconds without the per-layer table (what a trial stores)."""
        return {"cached": self.count("cache"), "computed": self.count("computed"), "mixers": self.mixers,
                "calibration_s": self.calibration_s, "seconds": self.seconds}


class PlanApplier:
    """Applies plans to one loaded model in place (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, settings: CompressionSpec | None = None,
                 cache: CompressionCache | None = None, progress=None, calibration: CalibrationSet | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or CompressionSpec()
        try:
            self.workload = config_workload(model.config)
        except ValueError as err:
            raise PlanApplyError(f"model: {err}") from None
        self.linears = linear_modules(model)
        self.blocks = model.get_submodule(self.workload.block_prefix)
        self.storage_dtype = storage_dtype(model)
        round_to_storage(model, self.storage_dtype)  # the 16-bit model exports hold (evaluators.compress.storage)
        self.cache = cache or CompressionCache(model_fingerprint(model))
        self.progress = progress or (lambda message: log.info("%s", message))
        self._dense: dict[str, torch.Tensor] = {}
        self._touched: set[str] = set()
        self._hooks: list = []
        self._calib = calibration  # built from the tokenizer and settings on first need when None
        self._dense_hessians: dict[str, torch.Tensor] | None = None
        self._mixer_hessians: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ plan checks
    def block_of(self, name: str) -> int | None:
        return self.workload.block_of(name)

    def mlgru_names(self, block: int) -> list[str]:
        return [layer.name for layer in self.workload.mlgru_layers(block)]

    def effective_layers(self, plan: ModelPlan) -> list[LayerPlan]:
        """Every compressed layer the plan implies, in model order (MLGRU projections included)."""
        return [lp for lp in self.workload.effective_plan(plan).values() if not lp.is_identity]

    def validate(self, plan: ModelPlan) -> None:
        """One-line :class:`PlanApplyError` for names, blocks and N:M patterns this model cannot take
        (:func:`dse.arch.check_plan`), naming the layer or block and the field."""
        try:
            check_plan(plan, self.workload)
        except PlanMismatch as err:
            where = f"plan layer '{err.layer}'" if err.layer else f"plan block {err.block}"
            raise PlanApplyError(f"{where}: {err.field}: {err.problem}") from None

    # ------------------------------------------------------------------ apply / restore
    def apply(self, plan: ModelPlan) -> ApplyReport:
        """Restore the dense model, then install the plan's mixers and compressed layers."""
        started = time.perf_counter()
        self.validate(plan)
        report = ApplyReport()
        layers = self.effective_layers(plan)
        mixers = sorted(bp.index for bp in plan.blocks if bp.mixer == "mlgru")
        keys = self.layer_keys(plan)
        missing = [lp for lp in layers if not self.cache.layer_path(keys[lp.name]).exists()]
        absent = {lp.name for lp in missing}
        # Everything cached: layers the plan sets are overwritten anyway, so only the others need their
        # dense weights back. Anything to compute needs the whole dense model first (statistics, mixers).
        fresh_mixers = [b for b, key in self._mixer_keys(mixers).items()
                        if not self.cache.blob_path("mlgru", key).exists()]
        self.restore(keep={lp.name for lp in layers} if not (missing or fresh_mixers) else ())
        if self.settings.mode == "dense" and any(needs_calibration(lp) for lp in missing):
            self._ensure_dense_hessians(report)
        self._install_mixers(mixers, report)
        sequential = {lp.name for lp in missing if needs_calibration(lp) and self.settings.mode == "sequential"}
        # Blocks from the first one with a sequential layer to compute go block by block; the rest now.
        first = min((self._block_or_end(name) for name in sequential), default=len(self.blocks) + 1)
        with torch.no_grad():
            for lp in layers:
                if self._block_or_end(lp.name) < first:
                    self._set(lp, keys[lp.name], self._hessian_dense(lp) if lp.name in absent else None, report)
            if sequential:
                self._apply_sequential([lp for lp in layers if self._block_or_end(lp.name) >= first],
                                       keys, sequential, report)
        report.seconds = time.perf_counter() - started
        return report

    def layer_keys(self, plan: ModelPlan) -> dict[str, str]:
        """Cache key of every compressed layer the plan implies (:meth:`effective_layers`, model order): the
        entries :meth:`apply` loads or computes, e.g. for an export reading the stored :class:`PackedWeight`."""
        prefixes = self._prefix_digests(plan) if self.settings.mode == "sequential" else {}
        return {lp.name: self._key(lp, prefixes) for lp in self.effective_layers(plan)}

    def dense_output_head(self) -> torch.Tensor | None:
        """The dense weight ``[vocab, hidden]`` of the model's output head while the applied plan has changed it,
        else None: what keeps the proxy's KL exact with a compressed head (:func:`evaluators.fidelity.proxy_eval`)."""
        head = self.model.get_output_embeddings()
        name = next((n for n, m in self.linears.items() if m is head), None)
        return self._dense[name] if name in self._touched else None

    def restore(self, keep=()) -> None:
        """Put back the dense weights (except of the layers in ``keep``), remove activation quantisers and
        MLGRU mixers."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for block in mlgru_mod.installed_blocks(self.model):
            mlgru_mod.uninstall(self.model, block)
        with torch.no_grad():
            for name in self._touched - set(keep):
                weight_of(self.linears[name]).copy_(self._dense[name])
        self._touched &= set(keep)

    # ------------------------------------------------------------------ internals
    def _block_or_end(self, name: str) -> int:
        block = self.block_of(name)
        return len(self.blocks) if block is None else block

    def _calibration(self) -> CalibrationSet:
        if self._calib is None:
            if self.tokenizer is None:
                raise PlanApplyError("calibration: this plan's methods need calibration text; give the tokenizer")
            s = self.settings
            self._calib = CalibrationSet.build(self.tokenizer, s.windows, s.seq_len, s.seed)
        return self._calib

    def _prefix_digests(self, plan: ModelPlan) -> dict[int, str]:
        """Per block ``b`` (and ``len(blocks)`` for the layers after them): a digest of the plan of the
        blocks before ``b`` and of ``b``'s mixer, what sequential statistics of block ``b`` depend on."""
        layers: dict[int, list] = {}
        for d in plan.layers:
            if not d.is_identity:
                layers.setdefault(self._block_or_end(d.name), []).append(d.to_dict())
        mixers = {d.index: d.mixer for d in plan.blocks if d.mixer != "attention"}
        running = hashlib.sha256()
        digests = {}
        for block in range(len(self.blocks) + 1):
            running.update(json.dumps(["mixer", block, mixers.get(block)]).encode())
            digests[block] = running.copy().hexdigest()[:16]
            running.update(json.dumps(sorted(layers.get(block, []), key=lambda d: d["name"])).encode())
        return digests

    def _key(self, lp: LayerPlan, prefixes: dict[int, str]) -> str:
        choice = {k: v for k, v in lp.to_dict().items() if k != "name"}
        if not needs_calibration(lp):
            return entry_key(self.cache.fingerprint, lp.name, choice)
        context: list = [self._calibration().key, self.settings.mode]
        if self.settings.mode == "sequential":
            context.append(prefixes[self._block_or_end(lp.name)])
        return entry_key(self.cache.fingerprint, lp.name, choice, context)

    def _module(self, name: str) -> torch.nn.Module:
        return self.linears.get(name) or self.model.get_submodule(name)

    def _set(self, lp: LayerPlan, key: str, hessian, report: ApplyReport) -> None:
        module = self._module(lp.name)
        t0 = time.perf_counter()
        packed = self.cache.load_layer(key)
        source = "cache"
        if packed is None:
            if needs_calibration(lp) and hessian is None:
                raise RuntimeError(f"layer {lp.name}: no calibration statistics")
            packed = compress_layer(self._dense_weight(lp.name, module), lp, hessian)
            self.cache.save_layer(key, packed, {"layer": lp.name, "label": lp.label})
            source = "computed"
        if lp.name in self.linears:
            self._untie(module)
            self._dense_weight(lp.name, module)
            self._touched.add(lp.name)
        weight = weight_of(module)
        weight.copy_(packed.dequantize().to(device=weight.device, dtype=weight.dtype))
        if lp.fmt.is_ternary:
            self._hooks.append(BitLinearForward.install(module, packed))
        report.layers[lp.name] = {"label": lp.label, "method": f"{lp.prune}/{lp.quant}", "source": source,
                                  "seconds": time.perf_counter() - t0}

    def _dense_weight(self, name: str, module: torch.nn.Module) -> torch.Tensor:
        """The layer's uncompressed weight ``[out, in]`` (kept from the first time the layer is changed)."""
        if name not in self.linears:
            return weight_of(module).detach().clone()  # an MLGRU projection: its distilled weight
        if name not in self._dense:
            self._dense[name] = weight_of(module).detach().clone()
        return self._dense[name]

    def _untie(self, module: torch.nn.Linear) -> None:
        emb = self.model.get_input_embeddings()
        if emb is not None and module.weight is emb.weight:
            module.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)

    # ------------------------------------------------------------------ statistics
    def _hessian_dense(self, lp: LayerPlan):
        if not needs_calibration(lp) or self.settings.mode != "dense":
            return None
        if lp.name.endswith(".mlgru.o_proj"):
            return self._mixer_hessians[lp.name]
        return self._dense_hessians[lp.name]

    def _ensure_dense_hessians(self, report: ApplyReport) -> None:
        if self._dense_hessians is not None:
            return
        calib = self._calibration()
        cached = self.cache.load_hessians(calib.key)
        if cached is None:
            t0 = time.perf_counter()
            self.progress(f"calibration: input statistics of {len(self.linears)} layers on {calib.tokens} "
                          "tokens of the dense model (once per model)")
            attr = self.workload.arch.mixer
            extra = {n: getattr(self.blocks[b], attr) for b in range(len(self.blocks)) for n in self.mlgru_names(b)[:3]}
            cached = collect_hessians(self.model, calib, self.linears, extra)
            self.cache.save_hessians(calib.key, cached)
            report.calibration_s += time.perf_counter() - t0
        self._dense_hessians = cached

    def _apply_sequential(self, layers: list[LayerPlan], keys: dict[str, str], missing: set[str],
                          report: ApplyReport) -> None:
        """Blocks from the first one with a missing calibrated layer on, in order (module docstring)."""
        t0 = time.perf_counter()
        by_block: dict[int, list[LayerPlan]] = {}
        for lp in layers:
            by_block.setdefault(self._block_or_end(lp.name), []).append(lp)
        last = max(by_block)
        in_blocks = any(b < len(self.blocks) for b in by_block)
        runner = BlockRunner(self.model, self.blocks, self._calibration()) if in_blocks else None
        for block in range(min(last, len(self.blocks) - 1) + 1 if in_blocks else 0):
            todo = by_block.get(block, [])
            hessians: dict[str, torch.Tensor] = {}
            need = {lp.name: self._module(lp.name) for lp in todo if lp.name in missing}
            if need:
                self.progress(f"calibration: block {block}, {len(need)} layer(s)")
                hooks = HessianHooks(need)
                runner.run(block, advance=False, hooks=hooks)
                hessians = hooks.remove()
            for lp in todo:
                self._set(lp, keys[lp.name], hessians.get(lp.name), report)
            if block < last:
                runner.run(block)
        if len(self.blocks) in by_block:  # lm_head and other layers after the blocks
            todo = by_block[len(self.blocks)]
            need = {lp.name: self._module(lp.name) for lp in todo if lp.name in missing}
            hessians = collect_hessians(self.model, self._calibration(), need) if need else {}
            for lp in todo:
                self._set(lp, keys[lp.name], hessians.get(lp.name), report)
        report.calibration_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ MLGRU mixers
    def _mixer_keys(self, blocks: list[int]) -> dict[int, str]:
        s = self.settings
        return {b: entry_key(self.cache.fingerprint, "mlgru", b, self._calibration().key, s.distill_steps,
                             s.distill_lr, s.seed) for b in blocks}

    def _install_mixers(self, blocks: list[int], report: ApplyReport) -> None:
        if not blocks:
            return
        s = self.settings
        keys = self._mixer_keys(blocks)
        cached = {b: self.cache.load_blob("mlgru", keys[b]) for b in blocks}
        todo = [b for b in blocks if cached[b] is None]
        if todo:  # the model is dense here: capture the attention inputs/outputs of every block to distil
            self.progress(f"MLGRU: distilling block(s) {todo} from attention ({s.distill_steps} steps each)")
            io = mlgru_mod.capture_attention_io(self.model, todo, self._calibration().input_ids)
        n = len(self.blocks)
        for b in blocks:
            t0 = time.perf_counter()
            attention = getattr(self.blocks[b], self.workload.arch.mixer)
            mixer = mlgru_mod.from_attention(attention, self.model.config, b, n, seed=s.seed)
            name_o = self.mlgru_names(b)[3]
            if cached[b] is None:
                x, y = io.pop(b)
                stats = mlgru_mod.distill(mixer, x, y, steps=s.distill_steps, lr=s.distill_lr, seed=s.seed)
                hooks = HessianHooks({name_o: mixer.o_proj})
                with torch.inference_mode():
                    for chunk in x.split(4):
                        hooks.reset_sharing()
                        mixer(chunk.to(mixer.o_proj.weight))  # the model's device and dtype
                o_hessian = hooks.remove()[name_o]
                tensors = {f"state.{k}": v.detach().clone() for k, v in mixer.state_dict().items()}
                self.cache.save_blob("mlgru", keys[b], tensors | {"o_hessian": o_hessian},
                                     {k: str(v) for k, v in stats.items()})
                info = {"source": "computed", **stats}
            else:
                tensors, meta = cached[b]
                mixer.load_state_dict({k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")})
                o_hessian = tensors["o_hessian"]
                info = {"source": "cache", **{k: float(v) for k, v in meta.items()}}
            mixer.eval().requires_grad_(False)
            mlgru_mod.install(self.model, b, mixer)
            self._mixer_hessians[name_o] = o_hessian
            report.mixers[b] = info | {"seconds": time.perf_counter() - t0}
