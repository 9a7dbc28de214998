"""Values of the `llm` job's config: every field, the paper's setup and the `:tiny` copy.

`default_config()` lists every field the job reads (`onpo_jax.llm.job.run`),
one comment each with its unit and its symbol in the papers; `paper_config()`
is what the six paper configs (`configs/{llama3_8b,mistral_7b}_{onpo,inpo,idpo}.py`)
return, and `shrink_for_cpu()` is their `:tiny` variant.

Symbols: ONPO's η (arXiv 2502.16852, §5 for the settings); INPO's η_I and τ
(arXiv 2407.00617; η_I = 1/η of ONPO); SPPO's β = 1/η_SPPO; DPO's β and label
smoothing ε; Nash-MD's α and β (arXiv 2312.00886); docs/baselines.md §1-§2
gives each method's loss in them. docs/algorithm.md §5.1 lists what the paper
states and §5.2 our defaults where it is silent; the comments below say which
is which. Paths must be local directories: nothing is downloaded.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from onpo_jax.llm import config as llm_config

# --config suffix method name -> `selfplay.methods` (iterative DPO is "dpo").
PAPER_METHODS = {"onpo": ("onpo_two_step",), "inpo": ("inpo",), "idpo": ("dpo",)}


def judge_section(**overrides) -> ml_collections.ConfigDict:
  """A judge's fields (`config.judge`, each entry of `config.eval.judges`).

  Args:
    **overrides: field values to set instead of the defaults.
  """
  j = ml_collections.ConfigDict()
  # 'pairwise' (pair-pm LM judge, the paper's oracle) | 'reward' (BT RM) | 'verifiable' (the
  # majority over each prompt's checkable constraints; no model, onpo_jax.oracles.verifiable)
  j.kind = "pairwise"
  j.path = ""  # local HF directory or GGUF file of the judge ("" for 'verifiable')
  j.tokenizer_path = ""  # "" = judge.path
  j.dtype = "bfloat16"  # judge parameters and compute, frozen
  # Input format: 'rlhflow_pair_pm' (the paper's judge, its published format) | 'plain' |
  # 'self_judge' (an instruct model asked which answer is better;
  # onpo_jax.oracles.judge.JUDGE_PRESETS); the three fields below override single parts.
  j.preset = "rlhflow_pair_pm"
  j.template = ""  # "" = the preset's template
  j.use_chat_template = True  # wrap the filled template in the judge's chat template
  j.labels = ("A", "B")  # judge tokens meaning "A is better" / "B is better"
  j.max_length = 4096  # judge input tokens (both responses cut alike, then the context)
  j.micro_batch_size = 8  # judge rows per forward pass
  j.offload = False  # keep the judge in pinned host memory except while judging
  j.hf_config = None  # config.json content for memory plans when judge.path is absent
  unknown = sorted(set(overrides) - set(j.keys()))
  if unknown:
    raise ValueError(f"judge_section: unknown fields {unknown}; expected some of {sorted(j)}")
  j.update(overrides)
  return j


def default_config() -> ml_collections.ConfigDict:
  """Every field of the `llm` experiment, with the ONPO paper's settings."""
  c = ml_collections.ConfigDict()
  c.experiment = "llm"  # dispatch key in onpo_jax.main.EXPERIMENTS
  c.seed = 0  # fixes sampling, oracle draws, minibatch order and the prompt split

  c.policy = ml_collections.ConfigDict()
  c.policy.path = ""  # π_SFT: local HF directory (config.json + safetensors) or GGUF file
  c.policy.tokenizer_path = ""  # tokenizer directory; "" = policy.path
  c.policy.param_dtype = "float32"  # master weights of π (and of π' in the optimizer state)
  c.policy.dtype = "bfloat16"  # compute dtype of activations
  c.policy.remat = True  # rematerialise blocks in the backward pass
  c.policy.logprob_chunk_size = 256  # predictions per chunk of the response's [B, R, V] log-softmax (0 = all)
  c.policy.hf_config = None  # config.json content used for memory plans when policy.path is absent

  c.ref = ml_collections.ConfigDict()
  c.ref.dtype = "bfloat16"  # frozen π_ref = π_SFT (INPO / DPO anchor, Nash-MD mixture)
  c.ref.offload = False  # keep π_ref in pinned host memory except while it is used

  # LoRA (onpo_jax.models.lora, docs/lora.md): π, ONPO's π' and π_ref as adapter trees
  # over one frozen base (π_ref = the base); off = full fine-tuning.
  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = False
  c.lora.rank = 16  # r (PEFT `r`)
  c.lora.alpha = 32.0  # α; updates are scaled by α/r (PEFT `lora_alpha`)
  # projections to adapt (PEFT names; a tuple, so that a command line can set fewer)
  c.lora.target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj")
  c.lora.dropout = 0.0  # must be 0: merged weights never see the adapter's input activations
  c.lora.adapter_dtype = "float32"  # adapters and their optimizer state
  c.lora.base_dtype = "bfloat16"  # the frozen base (replaces policy.param_dtype)

  c.judge = judge_section()  # the oracle of the self-play rounds

  c.data = ml_collections.ConfigDict()
  c.data.source = "hf_dir"  # 'files' (jsonl/parquet) | 'hf_dir' | 'tfds' (onpo_jax.data)
  c.data.paths = ""  # the HF dataset directory or prompt file(s), e.g. prompt-collection-v0.1
  c.data.split = "train"  # dataset split to read prompts from
  c.data.tfds_data_dir = ""  # array_record output directory (source='tfds')
  c.data.max_prompt_length = 1024  # P: longest templated prompt, tokens
  c.data.overlong = "drop"  # 'drop' | 'truncate' prompts longer than P
  c.data.use_chat_template = True  # render prompts with the policy's chat template
  c.data.shuffle_seed = 0  # one global shuffle; round t uses its own disjoint slice

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 2048  # N: response tokens per sample (stops at EOS)
  c.sampling.top_p = 1.0  # nucleus sampling (1 = off); temperature is selfplay.temperature
  c.sampling.micro_batch_size = 64  # sampler rows (prompts × K) per call
  c.sampling.prompt_buckets = (128, 256, 512, 1024)  # left-padded prompt lengths (one compile each)
  c.sampling.cache_dtype = "bfloat16"  # KV-cache dtype
  # Decoding steps between checks whether every row has ended; 0: 8 on GPUs, where a
  # check waits for the device, 1 elsewhere. Samples do not depend on it.
  c.sampling.eos_check_every = 0
  # KV-cache lengths the decoding loop grows through: a step reads every slot of its
  # cache, so 4 segments read about 5/8 of the slots of one, for up to about twice
  # the KV-cache memory. Samples do not depend on it.
  c.sampling.cache_segments = 1
  # Decoding steps' activations: 'features' ([D, B], the kernels copied transposed once
  # per sampler call: faster GEMMs on CPU, one more copy of the kernels in memory),
  # 'tokens' ([B, 1, D]) or 'auto' ('features' on CPU only). Samples do not depend on it.
  c.sampling.decode_layout = "auto"
  # Prefill each distinct prompt of a sampler call once (a round's batch holds every
  # prompt selfplay.num_samples times) and copy its KV cache to the rows that hold it.
  # Samples do not depend on it.
  c.sampling.share_prefill = True

  c.selfplay = ml_collections.ConfigDict()
  # onpo_jax.selfplay.engine.METHODS names, each trained from the same SFT policy.
  c.selfplay.methods = ("onpo_two_step",)
  c.selfplay.num_rounds = 3  # T: the paper's 3 iterations, as INPO
  # Prompts per round: not stated in the paper; our default, about 60k prompts / 3
  # rounds rounded to a multiple of the global batch 128.
  c.selfplay.prompts_per_round = 19968
  c.selfplay.num_samples = 8  # K responses per prompt (the paper, as INPO)
  c.selfplay.pairing = "tournament"  # INPO's knockout, best vs worst (the paper's practice)
  # Tournament games compare with the judge's probability (winner = P > ½, tie to the
  # first), as INPO's and RLHFlow's pipelines do; 'bernoulli' draws each game instead.
  c.selfplay.tournament_mode = "deterministic"
  c.selfplay.epochs = 1  # passes over a round's pairs; not stated in the paper; 1 as in INPO
  c.selfplay.global_batch_size = 128  # pairs per optimizer update (the paper)
  c.selfplay.minibatch_size = 16  # pairs per micro-step (gradient accumulation up to 128)
  c.selfplay.learning_rate = 5e-7  # peak LR; the paper takes it from INPO (arXiv 2407.00617)
  c.selfplay.lr_schedule = "cosine"  # 'cosine' (linear warm-up, cosine decay; paper) | 'constant'
  c.selfplay.warmup_ratio = 0.03  # warm-up fraction of each regression's updates (the paper)
  c.selfplay.weight_decay = 0.0  # AdamW decoupled weight decay
  c.selfplay.max_grad_norm = 1.0  # global-norm clipping (0 = off)
  c.selfplay.logp_reduction = "sum"  # lp(y) = Σ response-token log-probs (targets assume 'sum')
  c.selfplay.init_from = "anchor"  # ONPO: each regression starts at its anchor
  c.selfplay.temperature = 1.0  # sampling temperature of π_t

  c.onpo = ml_collections.ConfigDict()
  c.onpo.eta = 100.0  # ONPO η (the paper: 1/η = 0.01); target η/2 = 50 on the margin
  c.omd = ml_collections.ConfigDict()
  c.omd.eta_inpo = 0.01  # η_I of INPO w/o KL (= 1/η of ONPO)
  c.inpo = ml_collections.ConfigDict()
  c.inpo.eta_inpo = 0.005  # INPO η_I (the paper); step 1/η_I, target 1/(2η_I) = 100
  c.inpo.tau = 0.005 / 3  # INPO τ = η_I/3 (the paper)
  c.sppo = ml_collections.ConfigDict()
  c.sppo.beta = 0.001  # SPPO β = 1/η_SPPO (SPPO paper η = 1e3)
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # iterative-DPO β; not stated in the paper; RLHFlow's recipe uses 0.1
  c.dpo.label_smoothing = 0.0  # ε
  c.online_ipo = ml_collections.ConfigDict()
  c.online_ipo.beta = 0.1  # IPO β: target 1/(2β)
  c.nash_md = ml_collections.ConfigDict()
  c.nash_md.alpha = 0.125  # mixture weight of π_ref
  c.nash_md.beta = 0.05  # KL coefficient

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
  c.mesh.variant = ""  # MESH_VARIANTS key the shape came from (documentation only)

  c.eval = ml_collections.ConfigDict()
  # AlpacaEval-style JSON/JSONL with "instruction" (or "prompt"; "" = no evaluation); records
  # with "constraints" also get their constraint satisfaction measured
  c.eval.prompt_file = ""
  c.eval.reference_outputs = ""  # AlpacaEval outputs file to compare with; "" = the SFT policy
  c.eval.max_prompts = 0  # evaluate on the first n prompts (0 = all)
  c.eval.max_new_tokens = 2048  # response tokens per evaluation answer
  c.eval.temperature = 0.0  # 0 = greedy decoding
  c.eval.micro_batch_size = 32  # sampler rows per call
  c.eval.confidence = 0.95  # CI level of the win rate
  c.eval.generator = ""  # AlpacaEval "generator" name ("" = "<method>-round<t>")
  # More judges of the same answers, by name (each a judge_section(); metrics eval/<name>/...):
  # win rates under oracles other than the one the rounds trained against
  c.eval.judges = ml_collections.ConfigDict()
  c.eval.show_examples = 2  # held-out prompts whose SFT / current answers each round logs

  c.export = ml_collections.ConfigDict()
  c.export.dtype = "bfloat16"  # dtype of the exported HF checkpoint
  c.export.max_shard_size = "5GB"  # safetensors shard size

  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False  # call jax.distributed.initialize (experiments/run.py)
  # Unset (None) fields are auto-detected by jax.distributed (TPU pods, SLURM, Open MPI);
  # typed placeholders so that they can be set from the command line.
  c.distributed.coordinator_address = placeholder(str)  # "host:port" of process 0
  c.distributed.num_processes = placeholder(int)  # processes in the job
  c.distributed.process_id = placeholder(int)  # this process's index
  c.distributed.local_device_ids = placeholder(tuple)  # devices this process uses

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 2  # orbax checkpoints kept (one per finished round of a method)
  c.log_every_seconds = 60.0  # progress line at most this often
  # Stop before loading any model when the memory plan (onpo_jax.llm.memory, a lower
  # bound) exceeds one device's memory (accelerator limit; CPU: available host RAM)
  c.check_memory = True
  # Resume a workdir's run although a result-changing field differs from its saved
  # config.json (onpo_jax.infra.run_record); off: such a resume is refused
  c.allow_config_change = False
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:tiny` variant: same fields, sizes for tiny local checkpoints on CPU."""
  c.policy.param_dtype = "float32"
  c.policy.dtype = "float32"
  c.policy.remat = False
  c.policy.logprob_chunk_size = 8
  c.data.max_prompt_length = 24
  c.sampling.max_new_tokens = 6
  c.sampling.micro_batch_size = 8
  c.sampling.prompt_buckets = (24,)
  c.sampling.cache_dtype = "float32"
  c.judge.dtype = "float32"  # bf16 sums depend on the sharding; f32 keeps runs comparable
  # The reference in the policy's dtype, so π_ref = π_1 exactly at round 1 (DPO and
  # INPO margins start at zero); bf16 would make them differ by rounding.
  c.ref.dtype = "float32"
  c.judge.max_length = 96
  c.judge.micro_batch_size = 8
  c.judge.use_chat_template = False
  c.selfplay.num_rounds = 1
  c.selfplay.prompts_per_round = 4
  c.selfplay.num_samples = 4
  c.selfplay.global_batch_size = 4
  c.selfplay.minibatch_size = 2
  c.selfplay.learning_rate = 1e-3
  c.eval.max_new_tokens = 6
  c.eval.micro_batch_size = 4
  c.export.dtype = "float32"
  c.export.max_shard_size = "5GB"
  # A float32 base: LoRA with fresh adapters is then π_SFT bit for bit, as the reference is.
  c.lora.base_dtype = "float32"
  c.mesh.shape = (1, -1, 1)
  c.log_every_seconds = 0.0
  return c


def use_lora(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:lora` variant: rank-16 adapters on every projection over a bfloat16 base.

  Adapters start at B = 0 and move a low-rank subspace, so the usual practice
  takes a learning rate about 10x that of full fine-tuning (the LoRA paper's
  GPT-3 runs: 2e-4 vs 2e-5 class rates); everything else stays as it is.
  """
  c.lora.enabled = True
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj")
  c.lora.base_dtype = "bfloat16"
  c.selfplay.learning_rate = 10 * c.selfplay.learning_rate
  return c


def paper_arg_spec(method: str) -> dict:
  """`parse_arg` spec of the paper configs' suffix: mesh variant, method, 'lora' and 'tiny'.

  Args:
    method: the config file's own method (`PAPER_METHODS` key), the default.
  """
  return dict(mesh=("gpu8", llm_config.MESH_VARIANTS), method=(method, PAPER_METHODS),
              lora=False, tiny=False)


def paper_config(model: str, method: str, *, mesh: str = "gpu8", lora: bool = False,
                 tiny: bool = False) -> ml_collections.ConfigDict:
  """The paper's setup for `model` and `method` on the mesh variant `mesh`.

  Args:
    model: which SFT policy: 'llama3_8b' (RLHFlow/LLaMA3-SFT) or 'mistral_7b'.
    method: 'onpo', 'inpo' or 'idpo' (iterative DPO), a `PAPER_METHODS` key.
    mesh: a `onpo_jax.llm.config.MESH_VARIANTS` key.
    lora: train LoRA adapters over a frozen base (`use_lora`).
    tiny: the CPU-sized copy for tiny local checkpoints of the same family.

  Raises:
    ValueError: an unknown model, method or mesh variant.
  """
  archs = {"llama3_8b": llm_config.LLAMA3_8B_HF, "mistral_7b": llm_config.MISTRAL_7B_HF}
  for name, value, known in (("model", model, archs), ("method", method, PAPER_METHODS),
                             ("mesh", mesh, llm_config.MESH_VARIANTS)):
    if value not in known:
      raise ValueError(f"paper_config: unknown {name} {value!r}; expected one of {sorted(known)}")
  c = default_config()
  c.selfplay.methods = PAPER_METHODS[method]
  c.policy.hf_config = dict(archs[model])
  c.judge.hf_config = dict(llm_config.LLAMA3_8B_HF)  # RLHFlow pair-pm is a Llama-3-8B
  c.mesh.shape, _ = llm_config.MESH_VARIANTS[mesh]
  c.mesh.variant = mesh
  if lora:
    use_lora(c)
  if tiny:
    shrink_for_cpu(c)
  return c
