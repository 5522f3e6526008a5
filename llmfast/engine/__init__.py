"""A vLLM-style inference engine: continuous batching over a paged KV cache with prefix caching."""
from llmfast.engine.llm import LLM
from llmfast.engine.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestOutput
from llmfast.engine.sampling_params import BeamSearchParams, SamplingParams

__all__ = [
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "LLM",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
]
