"""Compression methods for the linear layers and token mixers a :class:`~dse.plan.ModelPlan` names.

Modules, each small and named for what it holds:

* :mod:`.grid`: quantisation grids (GPTQ's convention) and round-to-nearest;
* :mod:`.prune`: N:M masks by magnitude and by Wanda;
* :mod:`.obs`: the SparseGPT / GPTQ second-order column loop (N:M chosen inside, groups, joint);
* :mod:`.ternary`: BitLinear ternary weights, 8-bit activations, least-squares scale refit;
* :mod:`.mlgru`: the MatMul-free MLGRU token mixer and its distillation from attention;
* :mod:`.methods`: one layer plan -> its method -> a :class:`~.packed.PackedWeight`;
* :mod:`.packed`: the stored form (codes, scales, zeros, N:M mask) and bit packing for export;
* :mod:`.calibration`: calibration tokens and the per-layer input Gram matrices (Hessians);
* :mod:`.cache`: the on-disk cache of compressed layers, Hessians and distilled MLGRUs;
* :mod:`.apply`: :class:`PlanApplier`, which applies plans to one loaded model, layer-sequentially.
"""

from evaluators.compress.apply import ApplyReport, PlanApplier, PlanApplyError
from evaluators.compress.methods import compress_layer, needs_calibration

__all__ = ["ApplyReport", "PlanApplier", "PlanApplyError", "compress_layer", "needs_calibration"]
