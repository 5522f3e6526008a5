"""Drop-in modules built on llmfast.ops."""
from llmfast.nn.attention import MultiheadAttention
from llmfast.nn.norm import FusedAddLayerNorm, FusedAddRMSNorm, LayerNorm, RMSNorm
from llmfast.nn.quant_linear import QuantLinear

__all__ = ["FusedAddLayerNorm", "FusedAddRMSNorm", "LayerNorm", "MultiheadAttention", "QuantLinear", "RMSNorm"]
