"""Drop-in modules built on llmfast.ops."""
from llmfast.nn.norm import FusedAddLayerNorm, FusedAddRMSNorm, LayerNorm, RMSNorm

__all__ = ["FusedAddLayerNorm", "FusedAddRMSNorm", "LayerNorm", "RMSNorm"]
