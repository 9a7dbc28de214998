"""Infrastructure every job shares: orbax checkpoints, metrics (JSONL and TensorBoard), PNG plots,
glibc malloc settings for XLA:CPU (`host_memory`), the type checks that input validation shares
(`checks`).

Imports nothing from the rest of `onpo_jax`.
"""
