"""The public functional API: one dispatch point per op (validate -> pick backend -> call)."""
from llmfast.ops._checks import trusted_index_values
from llmfast.ops.attention import attention
from llmfast.ops.norm import add_layer_norm, add_rms_norm
from llmfast.ops.kv_cache import write_kv_cache
from llmfast.ops.paged import paged_attention
from llmfast.ops.quant_matmul import quant_matmul

__all__ = ["add_layer_norm", "add_rms_norm", "attention", "paged_attention", "quant_matmul", "trusted_index_values",
           "write_kv_cache"]
