"""Weight-only quantization: quantize, pack, dequantize."""
