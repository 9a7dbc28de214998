"""Helpers for tests, tutorials and walk-throughs: tiny random HF checkpoints and tokenizers.

Everything is built locally (nothing is downloaded); `tiny_hf` needs
`transformers` and `torch` (the package's `test` extra).
"""
