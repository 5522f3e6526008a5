"""Weight-only quantization: quantize, pack, dequantize."""
from llmfast.quant.quantize import quantize
from llmfast.quant.weight import QuantizedWeight, pack_int4, unpack_int4

__all__ = ["QuantizedWeight", "pack_int4", "quantize", "unpack_int4"]
