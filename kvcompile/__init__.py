"""kvcompile: an ahead-of-time compiler that stores LLM decoders' KV cache in 4 bits."""

__version__ = "0.1.0"
