r"""INPO on RLHFlow/LLaMA3-SFT with RLHFlow's 8B pairwise preference model (ONPO arXiv 2502.16852 §5).

Paper settings (onpo_jax.llm.default_config documents every field): 1/η = 0.01,
global batch 128 pairs, cosine schedule with warm-up 0.03, K = 8 samples with
INPO's tournament, T = 3 rounds, peak LR 5e-7 (taken from INPO, arXiv 2407.00617),
INPO η_I = 0.005, τ = η_I/3. Model, judge and data are local directories.

Launch on one 8-GPU node (the paper's 8×A100 40 GB):

    python -m experiments.run --config=configs/llama3_8b_inpo.py:gpu8 --workdir=runs/llama3_8b_inpo \
      --config.policy.path=/models/LLaMA3-SFT \
      --config.judge.path=/models/pair-preference-model-LLaMA3-8B \
      --config.data.paths=/data/prompt-collection-v0.1 \
      --config.eval.prompt_file=/data/alpaca_eval.json

On a TPU slice, run the same command on every host with the slice's variant
(v5p-8, v5p-16, v5p-64, v4-16, v4-32) and `--config.distributed.enabled=True`
(jax.distributed.initialize auto-detects the slice):

    python -m experiments.run --config=configs/llama3_8b_inpo.py:v5p-16 --workdir=gs://bucket/llama3_8b_inpo \
      --config.distributed.enabled=True --config.policy.path=... --config.judge.path=... \
      --config.data.paths=...

`:tiny` is a CPU-sized copy for tiny local checkpoints of the same family (README,
"Aligning a real model"); suffixes combine with commas, e.g. `:v5p-64,inpo`.
"""

from onpo_jax import llm


def get_config(arg=None):
  """Paper config; `arg` picks the mesh variant, the method and/or 'tiny'."""
  return llm.paper_config("llama3_8b", "inpo", arg)
