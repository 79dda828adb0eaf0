"""bnbx: quantization for large language models.

NF4/FP4 4-bit and 8-bit blockwise storage (bitsandbytes-compatible bytes and state_dict keys) and int8
absmax/zero-point quantization, as ``torch.ops.bnbx`` ops with vectorized CPU and CUDA kernels.
"""

from . import _library

_library.load()

from . import _ops  # noqa: E402, F401  (fake kernels for the ops registered by _C.so)
from . import functional  # noqa: E402
from ._library import cpu_capability, cuda_built  # noqa: E402
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

__version__ = "0.1.0"

__all__ = [
    "QuantState",
    "cpu_capability",
    "cuda_built",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_int8",
    "dequantize_nf4",
    "functional",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_int8",
    "quantize_nf4",
]
