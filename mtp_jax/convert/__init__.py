"""Checkpoint interoperability: Meta's Llama/multi-token format and Hugging Face Llama, in and out."""
