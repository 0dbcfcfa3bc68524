"""Analytical FPGA accelerator cost model for compressed LLMs (numpy/pyyaml/stdlib and dse.plan only).

    from hwcost import Accelerator, Workload, estimate
    report = estimate(plan, Workload.from_hf_config(config), Accelerator("kria-kv260", clock_mhz=300))
    report.decode_tokens_per_s, report.j_per_token, report.fits
    batch = estimate_batch(PlanBatch.from_plans(plans, workload), accel)   # arrays over the plans

Device figures live in ``hwcost/data/devices.yaml`` and model constants in
``hwcost/data/constants.yaml``, each with its source; the per-format datapath formulas are in
:mod:`hwcost.kernels`, the accelerator-level ones in :mod:`hwcost.model`, and the reproduction of
published designs in :mod:`hwcost.calibration`.
"""

from hwcost.accelerator import Accelerator
from hwcost.devices import Device, get_device, list_devices
from hwcost.model import (METRIC_NAMES, METRICS, BatchReport, EngineCost, HwReport, LayerCost, PlanBatch, estimate,
                          estimate_batch)
from dse.arch import LinearLayer, Workload

__all__ = [
    "Accelerator", "BatchReport", "Device", "EngineCost", "HwReport", "LayerCost", "LinearLayer", "METRICS",
    "METRIC_NAMES", "PlanBatch", "Workload", "estimate", "estimate_batch", "get_device", "list_devices",
]
