"""The decoder shapes the single-side JAX benchmarks build with random weights."""

from __future__ import annotations

from onpo_jax.models.config import DecoderConfig


def smollm2_config(num_layers: int = 30, **overrides) -> DecoderConfig:
  """SmolLM2-135M's shapes (its 30 layers by default): d 576, 9 heads over 3
  kv heads of 64, MLP 1536, vocabulary 49152 tied to the embedding.

  `overrides` set further DecoderConfig fields (dtypes, attention kernel,
  max_position_embeddings, ...).
  """
  fields = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_layers=num_layers, num_heads=9, num_kv_heads=3, head_dim=64,
                tie_word_embeddings=True, max_position_embeddings=8192)
  return DecoderConfig(**{**fields, **overrides})
