"""llmfast: GPU kernels for large language models, with reference and CPU fallbacks."""
from llmfast.backends import BackendUnavailable, available_backends
from llmfast import ops, nn, quant

__all__ = ["BackendUnavailable", "available_backends", "ops", "nn", "quant"]
__version__ = "0.1.0"
