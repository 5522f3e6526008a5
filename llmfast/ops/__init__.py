"""The public functional API: one dispatch point per op (validate -> pick backend -> call)."""
from llmfast.ops.norm import add_layer_norm, add_rms_norm

__all__ = ["add_layer_norm", "add_rms_norm"]
