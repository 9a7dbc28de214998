"""Infrastructure every job shares: orbax checkpoints, metrics (JSONL and TensorBoard), PNG plots,
glibc malloc settings for XLA:CPU (`host_memory`).

Imports nothing from the rest of `onpo_jax`.
"""
