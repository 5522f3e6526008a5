"""Model families on llmfast ops, run on flattened variable-length batches with a paged KV cache."""
from llmfast.models.bert import BertModel
from llmfast.models.gpt2 import GPT2LMHeadModel
from llmfast.models.llama import LlamaForCausalLM
from llmfast.models.loader import MODEL_CLASSES, load_model
from llmfast.models.metadata import AttentionMetadata, padded_forward

__all__ = [
    "AttentionMetadata",
    "BertModel",
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MODEL_CLASSES",
    "load_model",
    "padded_forward",
]
