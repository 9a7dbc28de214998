r"""Iterative DPO on RLHFlow/LLaMA3-SFT, judged by RLHFlow's 8B pairwise judge.

The paper's setup (ONPO arXiv 2502.16852 §5): DPO β = 0.1 on best-vs-worst pairs (β is
not stated in the paper; our default, RLHFlow's recipe); K = 8 samples per prompt
paired by INPO's tournament, global batch 128 pairs, AdamW with peak LR 5e-7 and a
cosine schedule with warm-up ratio 0.03, T = 3 rounds. `configs/llm_common.py`
documents every field; model, judge and data are local directories (nothing is
downloaded).

Launch on one 8-GPU node:

    python -m experiments.run --config=configs/llama3_8b_idpo.py:gpu8 \
      --workdir=runs/llama3_8b_idpo \
      --config.policy.path=/models/LLaMA3-SFT \
      --config.judge.path=/models/pair-preference-model-LLaMA3-8B \
      --config.data.paths=/data/prompt-collection-v0.1 \
      --config.eval.prompt_file=/data/alpaca_eval.json

On a TPU slice, run the same command on every host with the slice's variant
and `--config.distributed.enabled=True` (jax.distributed.initialize finds the
other hosts):

    python -m experiments.run --config=configs/llama3_8b_idpo.py:v5p-16 \
      --workdir=gs://bucket/llama3_8b_idpo --config.distributed.enabled=True \
      --config.policy.path=... --config.judge.path=... --config.data.paths=...

Resources: 8.03B policy parameters. Per-device memory planned by
`onpo_jax.llm.memory.estimate_memory` (parameters, optimizer state, gradients,
resident frozen models and one sampling KV cache; activations are not counted,
but after a method's first round the run adds its compiled train step's memory,
activations included, to memory.json):

      variant  mesh        GiB/device  devices
      gpu8     (1, 8, 1)       25.44  8 GPUs, 1 node (the paper: 8×A100 40 GB)
      v5p-8    (1, 4, 1)       50.88  4 chips × 95 GiB, 1 host
      v5p-16   (1, 8, 1)       25.44  8 chips × 95 GiB, 2 hosts
      v4-16    (1, 8, 1)       25.44  8 chips × 32 GiB, 2 hosts
      v4-32    (2, 8, 1)       23.94  16 chips × 32 GiB, 4 hosts
      v5p-64   (4, 8, 1)       23.19  32 chips × 95 GiB, 8 hosts

  On gpu8: policy 3.74 (float32), optimizer 11.22, gradients 3.74, π_ref 1.87, judge
  1.87 (bfloat16), KV cache 3.00 GiB. π_ref = π_SFT is resident in bfloat16 (DPO
  anchors on it); `--config.ref.offload=True` / `--config.judge.offload=True` keep
  π_ref / the judge in pinned host memory between uses.

Produces, in --workdir: metrics.jsonl (per round: losses, norms, oracle
queries, tokens/s, win rate vs the SFT policy with its CI), memory.json (the
plan above), alpaca_eval/sft.json and alpaca_eval/dpo_round<t>.json
(AlpacaEval 2.0 outputs), checkpoints/ (a rerun resumes after the last
finished round), export/dpo/ (HF checkpoint in bfloat16 + tokenizer)
and summary.json.

Suffixes, comma-separated: a mesh variant (above; default gpu8), a method
(onpo | inpo | idpo; default idpo), `lora` (rank-16
adapters on every projection over a bfloat16 base, LR x10: `llm_common.use_lora`)
and/or `tiny`, the CPU-sized copy for tiny local checkpoints of the same family,
e.g. `:v5p-64,inpo`, `:lora` or `:lora,tiny`.
"""

from configs import common
from configs import llm_common


def get_config(arg=None):
  """The paper config; `arg` picks the mesh variant, the method, 'lora' and/or 'tiny'."""
  args = common.parse_arg(arg, **llm_common.paper_arg_spec("idpo"))
  return llm_common.paper_config("llama3_8b", args.method, mesh=args.mesh,
                                 lora=args.lora, tiny=args.tiny)
