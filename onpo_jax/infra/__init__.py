"""Infrastructure every job shares: orbax checkpoints, metrics (JSONL and TensorBoard), PNG plots.

Imports nothing from the rest of `onpo_jax`.
"""
