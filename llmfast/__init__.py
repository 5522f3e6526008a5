"""llmfast: GPU kernels for large language models, with reference and CPU fallbacks."""
from llmfast.backends import BackendUnavailable, available_backends
from llmfast import models, nn, ops, quant
from llmfast.engine import LLM, BeamSearchParams, CompletionOutput, RequestOutput, SamplingParams
from llmfast.patch import patch

__all__ = [
    "LLM", "BackendUnavailable", "BeamSearchParams", "CompletionOutput", "RequestOutput", "SamplingParams",
    "available_backends",
    "models", "nn", "ops", "patch", "quant",
]
__version__ = "0.1.0"
