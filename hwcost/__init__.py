"""Analytical FPGA accelerator cost model for compressed LLMs (numpy/pyyaml/stdlib and dse.plan only).

    from hwcost import Accelerator, Workload, estimate
    report = estimate(plan, Workload.from_hf_config(config), Accelerator("kria-kv260", clock_mhz=300))
    report.decode_tokens_per_s, report.j_per_token, report.fits

Device figures live in ``hwcost/data/devices.yaml`` and model constants in
``hwcost/data/constants.yaml``, each with its source; the formulas are in
:mod:`hwcost.model`.
"""

from hwcost.accelerator import Accelerator
from hwcost.devices import Device, get_device, list_devices
from hwcost.model import METRIC_NAMES, METRICS, EngineCost, HwReport, LayerCost, estimate
from hwcost.workload import LinearLayer, Workload

__all__ = [
    "Accelerator", "Device", "EngineCost", "HwReport", "LayerCost", "LinearLayer", "METRICS", "METRIC_NAMES",
    "Workload", "estimate", "get_device", "list_devices",
]
