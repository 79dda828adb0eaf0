"""bnbx: quantization for large language models.

NF4/FP4 4-bit and 8-bit blockwise storage (bitsandbytes-compatible bytes and state_dict keys) and int8
absmax/zero-point quantization, as ``torch.ops.bnbx`` ops with vectorized CPU and CUDA kernels.
"""

from . import _library

_library.load()

from . import _ops  # noqa: E402, F401  (fake kernels for the ops registered by _C.so)
from . import functional  # noqa: E402
from ._library import cpu_cache_stats, cpu_capability, cuda_built, empty_cpu_cache, set_cpu_cache_limit  # noqa: E402
from .functional import (  # noqa: E402
    dequantize_4bit,
    dequantize_blockwise,
    dequantize_fp4,
    dequantize_int8,
    dequantize_nf4,
    quantize_4bit,
    quantize_blockwise,
    quantize_fp4,
    quantize_int8,
    quantize_nf4,
)
from .quant_state import QuantState  # noqa: E402
from . import qat  # noqa: E402  (QAT: fake quantization, prepare/convert, data-free distillation)
from .qat import fake_quantize  # noqa: E402
from . import nn  # noqa: E402
from .matmul import matmul_4bit  # noqa: E402
from .integrations.config import BnbxConfig  # noqa: E402
from .integrations.quantize import dequantize_model, quantize_model_, replace_linear  # noqa: E402

__version__ = "0.1.0"


__all__ = [
    "BnbxConfig",
    "cpu_cache_stats",
    "empty_cpu_cache",
    "set_cpu_cache_limit",
    "dequantize_model",
    "quantize_model_",
    "replace_linear",
    "QuantState",
    "cpu_capability",
    "cuda_built",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_int8",
    "dequantize_nf4",
    "fake_quantize",
    "functional",
    "matmul_4bit",
    "nn",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_int8",
    "quantize_nf4",
    "qat",
]

# LLM.int8(): functional ops (also in bnbx.functional), the differentiable matmul and the layer
from . import matmul_int8  # noqa: E402,F401  (registers the autograd of bnbx::int8_mixed_linear)
from .functional_int8 import (  # noqa: E402
    int8_linear_matmul,
    int8_mixed_linear,
    int8_mm_dequant,
    int8_pack_weight,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
)
from .matmul_int8 import matmul_8bit  # noqa: E402

__all__ += [
    "int8_linear_matmul",
    "int8_mixed_linear",
    "int8_mm_dequant",
    "int8_pack_weight",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "matmul_8bit",
]


def _register_with_transformers() -> None:
    """``quant_method="bnbx"`` for transformers' from_pretrained, when transformers is installed."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return
    try:
        from .integrations import transformers as _hf
    except ImportError as error:  # transformers 4.x: no plugin loader (core_model_loading) to hook into
        import warnings

        warnings.warn(f"bnbx: transformers integration disabled (needs transformers >= 5.0): {error}", stacklevel=2)
        return
    _hf.register()


_register_with_transformers()
# LoRA adapters, peft interop (registered with peft lazily, when peft is imported), kbit training prep
from . import lora  # noqa: E402
from .lora import prepare_model_for_kbit_training  # noqa: E402

__all__ += ["lora", "prepare_model_for_kbit_training"]
