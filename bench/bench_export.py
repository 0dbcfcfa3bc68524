"""Exported checkpoints of the default model, side by side in one run: bytes against the cost model, reload fidelity.

    .venv/bin/python bench/bench_export.py [--out DIR]

For SmolLM2-135M and four plans (uniform INT4/g64, mixed INT8/INT4 with an INT8 head, uniform ternary, uniform
2:4 + INT4/g64), prints per checkpoint format: the weights file's bytes, the hardware report's ``weight_bytes``
(KV260 accelerator) and their ratio, the largest |logit difference| between a plain
``transformers.AutoModelForCausalLM.from_pretrained`` (float32) and the evaluated model on 2 x 64 validation
tokens (or the refusal), and the export's wall time. The compression cache is a temporary directory (RTN only,
so every layer is computed once, in seconds).

Targets (issue 15): bytes within 5% of ``weight_bytes`` for the formats that store what the cost model counts;
reload difference <= 1e-4.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dse.plan import LayerPlan, ModelPlan, Sparsity, WeightFormat  # noqa: E402
from evaluators.checkpoint import CheckpointError, save_applied  # noqa: E402
from evaluators.compress import PlanApplier  # noqa: E402
from evaluators.compress.cache import CompressionCache, model_fingerprint  # noqa: E402
from evaluators.fidelity import ProxySet  # noqa: E402
from evaluators.hf_export import save_hf  # noqa: E402
from evaluators.models import load_model  # noqa: E402
from hwcost import Accelerator, Workload, estimate  # noqa: E402


def plans(names: list[str]) -> dict[str, ModelPlan]:
    linears = [n for n in names if n != "lm_head"]

    def every(fmt, sparsity=None, head=None):
        layers = [LayerPlan(n, sparsity, fmt) for n in linears]
        return ModelPlan(tuple(layers + ([LayerPlan("lm_head", None, head)] if head else [])))

    mixed = ModelPlan(tuple(LayerPlan(n, None, WeightFormat("8", 64) if ".self_attn." in n else WeightFormat("4", 32))
                            for n in linears) + (LayerPlan("lm_head", None, WeightFormat("8", 64)),))
    return {"uniform int4/g64": every(WeightFormat("4", 64)), "attn int8/g64, mlp int4/g32, head int8": mixed,
            "uniform ternary": every(WeightFormat("ternary")),
            "uniform 2:4 + int4/g64": every(WeightFormat("4", 64), Sparsity(2, 4))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the checkpoints here (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-export-"))
    applier = PlanApplier(model, tokenizer, cache=CompressionCache(model_fingerprint(model), root / "cache"))
    workload = Workload.from_hf_config(model.config.to_dict())
    accel = Accelerator(device="kria-kv260")
    ids = ProxySet.build(tokenizer, windows=2, seq_len=64).input_ids
    from transformers import AutoModelForCausalLM

    print(f"{'plan':42s} {'format':18s} {'file MB':>9s} {'weight_bytes MB':>16s} {'ratio':>6s} "
          f"{'max |dlogit|':>13s} {'export s':>9s}")
    for i, (name, plan) in enumerate(plans([n for n, m in model.named_modules()
                                            if isinstance(m, torch.nn.Linear)]).items()):
        want_bytes = estimate(plan, workload, accel).weight_bytes_total
        for fmt, save in (("compressed-tensors", save_hf), ("dse-packed", save_applied)):
            out = root / f"plan{i}-{fmt}"
            started = time.perf_counter()
            try:
                save(applier, plan, out, **({"verify_load": False} if save is save_hf else {}))
            except CheckpointError as err:
                print(f"{name:42s} {fmt:18s} refused: {err}")
                continue
            seconds = time.perf_counter() - started
            with torch.no_grad():
                evaluated = applier.model(ids).logits
            file_bytes = next(out.glob("*.safetensors")).stat().st_size
            if save is save_hf:
                loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
                with torch.no_grad():
                    diff = f"{float((loaded(ids).logits - evaluated).abs().max()):.2e}"
                label = "bitnet" if "ternary" in name else fmt
            else:
                diff, label = "(no stock load)", fmt
            print(f"{name:42s} {label:18s} {file_bytes / 1e6:9.2f} {want_bytes / 1e6:16.2f} "
                  f"{file_bytes / want_bytes:6.3f} {diff:>13s} {seconds:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
