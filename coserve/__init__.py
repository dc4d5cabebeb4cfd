"""coserve: one quantized base LLM, many tenants' adapters, co-served fine-tuning."""

__version__ = "0.1.0"
