"""llmfast: GPU kernels for large language models, with reference and CPU fallbacks."""
from llmfast.backends import BackendUnavailable, available_backends
from llmfast import models, nn, ops, quant

__all__ = ["BackendUnavailable", "available_backends", "models", "nn", "ops", "quant"]
__version__ = "0.1.0"
