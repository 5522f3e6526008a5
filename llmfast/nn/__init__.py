"""Drop-in modules built on llmfast.ops."""
