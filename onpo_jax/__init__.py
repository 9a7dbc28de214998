"""onpo_jax: Optimistic Nash Policy Optimization (arXiv 2502.16852) in JAX."""

__version__ = "0.1.0"
