"""prepare() swaps nn.Linear for FakeQuantLinear (and wires KV-cache fake quantization); convert() swaps
FakeQuantLinear for QuantizedLinear, whose stored weights are exactly the ones the fake-quant forward used."""

from __future__ import annotations

import logging

from torch import nn

from .._model import output_layer_names
from .config import QATConfig
from .kv import attach_kv_fake_quant, is_llama_attention
from .modules import FakeQuantLinear, QuantizedLinear

logger = logging.getLogger(__name__)

DEFAULT_SKIP = ("lm_head",)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns)


def _check_names(model: nn.Module, names: tuple[str, ...], what: str) -> None:
    existing = {name for name, _ in model.named_modules()}
    missing = [n for n in names if n not in existing]
    if missing:
        raise ValueError(f"prepare: {what} names modules that do not exist in the model: {missing}")


def prepare(model: nn.Module, config: QATConfig, inplace: bool = True) -> nn.Module:
    """Prepare ``model`` for QAT: every ``nn.Linear`` (except ``lm_head``, output embeddings tied to the input
    embeddings, and ``config.skip``) becomes a :class:`FakeQuantLinear` sharing its parameters; with
    ``kv_bits < 16``, Llama-style attention modules fake-quantize post-RoPE K and V where the cache holds them.

    Raises ValueError when ``config.skip`` or ``config.modules`` name modules the model does not have.
    """
    if not isinstance(config, QATConfig):
        raise TypeError(f"prepare: config must be a QATConfig, got {type(config).__name__}")
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    _check_names(model, config.skip, "config.skip")
    if config.modules is not None:
        _check_names(model, config.modules, "config.modules")
    skip = DEFAULT_SKIP + config.skip
    output_layers = output_layer_names(model)
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name in output_layers or _matches(name, skip):
            continue
        if config.modules is not None and not _matches(name, config.modules):
            continue
        targets.append((name, module))
    for name, module in targets:
        model.set_submodule(name, FakeQuantLinear.from_linear(module, config))
    logger.info("bnbx.qat.prepare: %d Linear layers fake-quantized", len(targets))
    if config.quantize_kv:
        attention = {name: m for name, m in model.named_modules() if is_llama_attention(m) and not _matches(name, skip)}
        if not attention:
            raise ValueError("prepare: kv_bits < 16 but the model has no Llama-style attention modules")
        attach_kv_fake_quant(model, attention, dict(bits=config.kv_bits, granularity=config.kv_granularity,
                                                    symmetric=config.symmetric, range=config.range))
    model.qat_config = config
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear with a :class:`QuantizedLinear` storing its quantized weight (int8 codes
    and scales, or packed NF4/FP4 and absmax). KV-cache and activation fake quantization stay as they are (the
    values an int8/int4 cache and dynamic int8 activations would give)."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not targets:
        raise ValueError("convert: the model has no FakeQuantLinear layers; call bnbx.qat.prepare first")
    for name, module in targets:
        model.set_submodule(name, QuantizedLinear.from_fake_quant(module))
    return model
