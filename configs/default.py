r"""Self-play alignment on the exact-evaluation testbed: ONPO vs its baselines.

    python -m experiments.run --config=configs/default.py --workdir=runs/default
    python -m experiments.run --config=configs/default.py:tiny --workdir=/tmp/selfplay_tiny

SFT on a random "style" distribution, then T rounds of every method from the
same SFT policy with the same synthetic general-preference oracle; the exact
duality gap and win rate vs SFT are printed per round (`onpo_jax.testbed.job.run`).
Runs in a few minutes on 2 CPU cores. Symbols: ONPO's η (arXiv 2502.16852);
INPO's η_I and τ (arXiv 2407.00617; η_I is the inverse of ONPO's η); SPPO's β
(the inverse of the SPPO paper's η); DPO's β and label smoothing ε; Nash-MD's
α and β (arXiv 2312.00886).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  """Returns the default self-play config.

  `arg='tiny'` shrinks it for smoke tests; `arg='sweep'` adds the exact-mode η
  sweep of ONPO and OMD (η ∈ {0.5, 1, 2, 4}, about six more minutes on 2 cores).
  """
  args = common.parse_arg(arg, tiny=False, sweep=False)
  c = ml_collections.ConfigDict()
  c.experiment = "selfplay"
  c.seed = 0  # fixes oracle, prompts, SFT data; seed s of `seeds` derives its own run keys
  # S: seeds per method. Every reported number is a mean over them with a 95%
  # t-interval. Sampled rounds: seeds vary the sampling, oracle draws, prompt draws
  # and minibatch order in one game (also the game with selfplay.vary_game); exact
  # rounds draw nothing, so there seeds vary the game (oracle, prompts, SFT start).
  c.seeds = 5

  c.testbed = ml_collections.ConfigDict()
  c.testbed.vocab_size = 4  # V: tokens of prompts and responses (= oracle's vocabulary)
  c.testbed.response_length = 4  # L: tokens per response; |Y| = V^L = 256 responses
  c.testbed.prompt_length = 3  # P: tokens per prompt (no padding)
  c.testbed.num_prompts = 8  # C: distinct prompts; E_x is uniform over them
  c.testbed.start_temperature = 1.0  # temperature of the SFT start μ ∝ exp(style/temperature)

  c.oracle = ml_collections.ConfigDict()
  c.oracle.kind = "synthetic"  # 'synthetic' (general, cyclic knob) or 'bt' (its BT reward part)
  c.oracle.vocab_size = 4  # vocabulary the oracle scores; must equal model.vocab_size
  c.oracle.feature_dim = 16  # d: random-feature width
  c.oracle.strength = 4.0  # scale of the preference logit z (dimensionless)
  c.oracle.cyclic = 0.7  # κ ∈ [0, 1]: 0 = Bradley–Terry, 1 = purely cyclic
  c.oracle.cyclic_spread = 0.3  # per-prompt spread of κ

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 4  # policy vocabulary = response vocabulary (nothing else can be sampled)
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 8
  c.model.max_position_embeddings = 16  # must be ≥ prompt_length + response_length
  c.model.dtype = "float32"  # parameters and compute of the sampled rounds (exact: exact.dtype)

  c.sft = ml_collections.ConfigDict()
  c.sft.num_steps = 300  # maximum-likelihood steps on samples of μ
  c.sft.batch_size = 128  # (prompt, response) samples per step
  c.sft.learning_rate = 3e-3  # Adam

  c.selfplay = ml_collections.ConfigDict()
  # Methods run side by side from the same SFT policy, in this order.
  c.selfplay.methods = ("onpo_two_step", "onpo_extrapolate", "omd", "inpo", "sppo", "dpo",
                        "online_ipo", "nash_md")
  c.selfplay.num_rounds = 8  # T: self-play rounds per method
  c.selfplay.prompts_per_round = 32  # N: prompts per round (drawn from the C testbed prompts)
  c.selfplay.num_samples = 8  # K: responses sampled per prompt from π_t
  c.selfplay.pairing = "tournament"  # 'tournament' | 'lambda_p' | 'all_pairs' (pair methods)
  # Tournament games: 'deterministic' (winner = P(A ≻ B) > ½, tie to the first; the
  # published pipelines) | 'bernoulli' (one oracle draw per game).
  c.selfplay.tournament_mode = "deterministic"
  c.selfplay.epochs = 2  # E: passes over each round's data
  c.selfplay.minibatch_size = 16  # training examples (pairs or samples) per gradient step
  c.selfplay.learning_rate = 3e-3  # inner optimizer (Adam) peak learning rate
  c.selfplay.logp_reduction = "sum"  # 'sum' | 'mean' over response tokens (targets assume 'sum')
  c.selfplay.init_from = "anchor"  # ONPO: each regression starts at its anchor ('anchor'|'policy')
  c.selfplay.temperature = 1.0  # sampling temperature (1 = the policy itself)
  # False: every seed plays one game (seeds vary sampling, oracle draws, prompt
  # draws, minibatch order). True: seed s also plays its own game (oracle,
  # prompts, SFT start), so intervals cover the choice of game too.
  c.selfplay.vary_game = False

  c.onpo = ml_collections.ConfigDict()
  c.onpo.eta = 2.0  # ONPO η: regression target η/2 on the log-ratio margin (sum of log-probs)
  c.omd = ml_collections.ConfigDict()
  c.omd.eta_inpo = 0.5  # INPO's η_I without KL (OMD step 1/η_I = ONPO's η)
  c.inpo = ml_collections.ConfigDict()
  c.inpo.eta_inpo = 0.5  # INPO's η_I (step 1/η_I; target 1/(2η_I))
  c.inpo.tau = 0.5 / 3  # INPO's τ (KL to SFT), τ < η_I; the paper uses τ = η_I/3
  c.sppo = ml_collections.ConfigDict()
  c.sppo.beta = 0.5  # SPPO β = 1/η_SPPO: target (P̂ − ½)/β per sample
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.5  # DPO β (inverse temperature of the implicit reward)
  c.dpo.label_smoothing = 0.0  # DPO ε ∈ [0, 0.5)
  c.online_ipo = ml_collections.ConfigDict()
  c.online_ipo.beta = 0.5  # IPO β: target 1/(2β) on the log-ratio margin vs SFT
  c.nash_md = ml_collections.ConfigDict()
  c.nash_md.alpha = 0.125  # Nash-MD α: mixture weight of π_ref in π_θ^{1−α} π_ref^{α}
  c.nash_md.beta = 0.05  # Nash-MD β: KL(π_θ‖π_ref) coefficient

  # Exact-expectation rounds (docs/testbed.md §8): each round's loss is the exact
  # expectation over the enumerated responses, solved full batch (Gauss–Newton in
  # table space, every seed at once), next to its tabular shadow (the same game
  # through onpo_jax.tabular's dynamics).
  c.exact = ml_collections.ConfigDict()
  c.exact.enabled = True
  c.exact.methods = ("onpo_two_step", "onpo_extrapolate", "omd", "inpo")
  c.exact.num_rounds = 64  # T of the exact rounds (slopes are fitted over rounds 1..T)
  c.exact.tol = 1e-6  # stop a regression when the gradient's global L2 norm is below this,
  c.exact.residual_tol = 1e-6  # or its loss is within this of the exact minimum
  c.exact.max_steps = 150  # Gauss–Newton steps per regression at most,
  c.exact.stall_steps = 20  # or until this many steps in a row make no progress
  # The exact rounds run in float64 (JAX x64 mode for them only; SFT stays
  # float32): in float32 the residuals stall near 1e-5 once a policy concentrates
  # and ONPO's iterates drift up to 5e-3 nats from their shadows by round 64.
  c.exact.dtype = "float64"
  # The tracked methods' neural iterates must stay within this KL (nats) of their
  # shadows at every round (ONPO extrapolate is reported, not bounded).
  c.exact.tracking_kl_bound = 1e-3
  # η sweep at T = num_rounds: ONPO's η and OMD's step 1/η_I set to each value
  # (empty: no sweep; `:sweep` sets it).
  c.exact.eta_grid = ()
  c.exact.sweep_methods = ("onpo_two_step", "omd")
  if args.sweep:
    c.exact.eta_grid = (0.5, 1.0, 2.0, 4.0)
  c.exact.vocab_size = 2  # the exact world: V = 2, L = 3 (|Y| = 8), 2 prompts, so that the
  c.exact.response_length = 3  # policy can represent every table and rounds stay cheap
  c.exact.num_prompts = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.nash_reference = True  # solve the per-prompt Nash LP once and report its gap (≈ 0)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 2  # orbax checkpoints kept (one per round of each method)
  c.log_every_seconds = 10.0  # progress line (rate and ETA) at most this often
  # Resume a workdir's run although a result-changing field differs from its saved
  # config.json (onpo_jax.infra.run_record); off: such a resume is refused
  c.allow_config_change = False
  # Persistent XLA compilation cache ('' = off); compilation dominates on CPU, so
  # a restarted run with the cache resumes in seconds.
  c.compilation_cache_dir = ""

  if args.tiny:
    c.testbed.vocab_size = c.oracle.vocab_size = c.model.vocab_size = 3
    c.testbed.response_length = 3  # |Y| = 27
    c.testbed.prompt_length = 2
    c.testbed.num_prompts = 3
    c.model.hidden_size = 16
    c.model.intermediate_size = 32
    c.model.num_layers = 1
    c.model.num_heads = 2
    c.model.num_kv_heads = 1
    c.model.head_dim = 8
    c.sft.num_steps = 20
    c.sft.batch_size = 32
    c.selfplay.num_rounds = 2
    c.selfplay.prompts_per_round = 4
    c.selfplay.num_samples = 4
    c.selfplay.epochs = 1
    c.selfplay.minibatch_size = 4
    c.seeds = 2
    c.exact.methods = ("onpo_two_step", "omd")
    c.exact.num_rounds = 3
    c.exact.max_steps = 10
    c.exact.eta_grid = (1.0,)
    c.exact.sweep_methods = ("omd",)
    c.exact.response_length = 2
    c.log_every_seconds = 0.0
  return c
