"""Settings of the compression transforms and the proxy fidelity (the study spec's ``compression:`` and
``proxy:`` sections; declared here, next to their users, and validated by ``dse.schema``)."""

from __future__ import annotations

from typing import Literal

from dse.schema import Int, Number, schema


@schema()
class CompressionSpec:
    """How calibrated methods and MLGRU distillation run (evaluators.compress.apply explains the modes)."""

    #: sequential: statistics through the already-compressed earlier blocks; dense: from the dense model
    mode: Literal["sequential", "dense"] = "sequential"
    #: calibration windows drawn from the calibration works
    windows: Int(1, 4096) = 16
    #: tokens per calibration window
    seq_len: Int(8, 8192) = 256
    #: seed of the calibration windows
    seed: Int(0) = 0
    #: Adam steps per distilled MLGRU block (0: not distilled)
    distill_steps: Int(0, 100_000) = 300
    #: Adam learning rate of the distillation
    distill_lr: Number(0, 1, open_lo=True, open_hi=True) = 2e-3


@schema()
class ProxySpec:
    """The proxy fidelity's token set: ``windows`` x ``seq_len`` tokens of the validation works."""

    #: windows of validation text
    windows: Int(1, 4096) = 8
    #: tokens per window
    seq_len: Int(8, 8192) = 256
