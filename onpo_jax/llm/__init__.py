"""The real-checkpoint job: aligning a Hugging Face model with a judge.

Configuration and validation, the backend that plugs real checkpoints into the
self-play engine, evaluation against a reference with AlpacaEval-format
outputs, HF export and per-device memory planning. May import the core math,
`oracles`, `selfplay`, `models`, `data` and `infra`; nothing imports it but
`onpo_jax.main`.
"""
