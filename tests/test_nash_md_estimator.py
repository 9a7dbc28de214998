"""Nash-MD's sampled policy gradient is unbiased at the policy that drew the samples.

What is compared (issue #15, item 6). On the `:tiny` testbed (C = 3 prompts,
|Y| = 27 responses) with α = 0.5 and two random policies θ and π_ref, far from
uniform and from each other (entropies ≈ 2.5 and 2.1 nats, ln 27 ≈ 3.3), so
that the mixture matters: opponents from π_θ instead would move g* by ≈ 25%:

  * the exact gradient g* = ∇_θ `exact.exact_loss('nash_md', ...)` at θ, whose
    data (`exact.exact_data`) are built from the tables of θ and of the
    token-level mixture π_mix ∝ π_θ^{1−α} π_ref^{α} (`exact.mixture_logp_table`)
    and held fixed: weights π_θ(y|x_c)/C and target P(y ≻ π_mix | x_c). It is
    ∇_θ mean_c [β KL(π_θ‖π_ref) − P(π_θ ≻ π_mix)] with the mixture held fixed
    (`test_exact_mode.py::test_nash_md_exact_gradient_is_the_objective_gradient`);
  * the sampled estimator ĝ(S) = ∇_θ `METHODS['nash_md'].loss` on one round's
    batch S = `Engine.collect('nash_md', θ, π_ref, all C prompts)`: K responses
    y_ck ~ π_θ(·|x_c) per prompt, each against its own opponent
    y'_ck ~ π_mix(·|x_c), drawn independently of y_ck.

Why E_S[ĝ(S)] = g*, exactly. Every sample of the batch has weight 1, so the
loss's weighted mean divides by the constant Σw = C·K and
  ĝ(S) = 1/(C·K) Σ_{c,k} [β·(lp_θ − lp_ref)(y_ck) − (P(y_ck ≻ y'_ck) − ½)]·∇lp_θ(y_ck).
Given y_ck, E[P(y_ck ≻ y'_ck)] = P(y_ck ≻ π_mix) (the opponent is independent),
and y_ck ~ π_θ(·|x_c), so each prompt contributes Σ_y π_θ(y|x_c)[...]∇lp_θ(y)
and the prompt average is Σ_{c,y} (π_θ(y|x_c)/C)[β·(lp_θ − lp_ref)(y) −
(P(y ≻ π_mix) − ½)]∇lp_θ(y), which is g* term by term: the exact weights
π_θ(y|x_c)/C already sum to 1, the baseline ½ is the same on both sides, and
the log-ratio is under a stop-gradient in both. This needs every prompt to get
the same number K of samples (the exact loss weighs prompts uniformly, 1/C) and
a constant Σw: importance ratios passed as `weights` would be self-normalised
by the weighted mean and biased. It holds only at the θ that sampled: after an
update the samples come from an older policy and, without importance weights,
the same estimator is biased.

The check. R independent batches (one `collect` call over the C prompts
repeated R + 1 times: every row is an independent draw, so the C·K rows of
repeat r form one round's batch; batch 0 is kept for the update below); each batch's gradient is projected on fixed
directions (random ones, g*, and the direction in which the mixture matters)
and z_j = (mean_r ⟨v_j, ĝ_r⟩ − ⟨v_j, g*⟩)/(sd_j/√R) must satisfy |z_j| ≤ 4
(CLT; a false alarm over 10 directions has probability < 1e-3, and the keys
are fixed). The same check must fail for two biased estimators, so it has
power: opponents from π_θ instead of the mixture (α = 0), and stale samples,
i.e. the gradient after one step of the engine's inner optimizer (Adam at
selfplay.learning_rate, on the whole of an independent batch: what the engine
now does once per round), taken on samples of the old policy and compared
with the exact gradient at the new parameters (what every minibatch step
after the first did when Nash-MD reused a round's samples). Measured with
R = 4000: max |z| ≈ 2.3 for the estimator, ≈ 16 without the mixture, ≈ 26
with stale samples after a step of KL(π_θ₁‖π_θ) ≈ 0.08 nats.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from configs import default as default_config
from onpo_jax.selfplay.engine import Engine
from onpo_jax.selfplay.engine import _policy_logps
from onpo_jax.selfplay.methods import METHODS
from onpo_jax.testbed import backend as testbed_backend
from onpo_jax.testbed import exact
from onpo_jax.testbed import world as testbed_world

R = 4000  # independent batches (rounds) per estimator
Z_MAX = 4.0  # |mean − exact| in standard errors, per direction
NUM_RANDOM_DIRECTIONS = 8
ALPHA = 0.5
THETA_SCALE, REF_SCALE = 0.2, 0.5  # noise added to the init: θ spread, π_ref peaked


def _collect(engine, world, theta, ref, key):
  """R + 1 batches of one round each, stacked: leaves [R + 1, C·K, ...], and their ref lp."""
  c, k = world.prompt_tokens.shape[0], engine.k
  prompts = jnp.tile(world.prompt_tokens, (R + 1, 1))
  mask = jnp.tile(world.prompt_mask, (R + 1, 1))
  ks = jax.random.split(key, 3)
  batch, _ = engine.collect("nash_md", theta, ref, prompts, mask, sample_key=ks[0],
                            mixture_key=ks[1], oracle_key=ks[2])
  anchor = engine.backend.anchor_logprobs(ref, batch)
  return jax.tree.map(lambda x: x.reshape((R + 1, c * k) + x.shape[1:]), (batch, anchor))


@pytest.fixture(scope="module")
def setup():
  cfg = default_config.get_config("tiny").copy_and_resolve_references()
  cfg.selfplay.methods = ("nash_md",)
  cfg.nash_md.alpha = ALPHA
  world = testbed_world.Testbed(cfg)
  flat, unravel = ravel_pytree(world.init_params)
  rng = np.random.default_rng(9)
  n_theta, n_ref = rng.normal(size=(2, flat.size)).astype(np.float32)
  theta, ref = unravel(flat + THETA_SCALE * n_theta), unravel(flat + REF_SCALE * n_ref)
  tb = cfg.testbed
  backend = testbed_backend.TestbedBackend(
      world.graphdef, world.model_config, world.oracle, response_length=tb.response_length,
      prompt_length=tb.prompt_length, temperature=cfg.selfplay.temperature,
      reduction=cfg.selfplay.logp_reduction)
  engine = Engine(backend, cfg)

  def token_logits(p):
    return exact.token_logits_table(world.graphdef, p, world.prompt_tokens, world.prompt_mask,
                                    world.responses)

  @jax.jit
  def exact_grad(p, alpha):
    """(flat g*, log π_θ table) at p: exact data from p's own tables, held fixed."""
    logits, pullback = jax.vjp(token_logits, p)
    ref_logits = token_logits(ref)
    table_of = lambda lg: exact.sequence_logp_from_token_logits(lg, world.responses)
    table = table_of(logits)
    mix = exact.mixture_logp_table(logits, ref_logits, world.responses, alpha)
    data = jax.lax.stop_gradient(exact.exact_data("nash_md", cfg, table, world.pref,
                                                  logp_mix=mix))
    anchors = {"ref": table_of(ref_logits)}
    # ∇_θ exact_loss(table(θ)) by the chain rule through the teacher-forced logits.
    d_logits = jax.grad(lambda lg: exact.exact_loss("nash_md", cfg, table_of(lg), anchors,
                                                    data)[0])(logits)
    return ravel_pytree(pullback(d_logits)[0])[0], table

  def batch_grad(p, batch, anchor):
    loss = lambda q: METHODS["nash_md"].loss(cfg, _policy_logps(backend, q, batch),
                                             {"ref": anchor}, batch.target, batch.weight)[0]
    return ravel_pytree(jax.grad(loss)(p))[0]

  @jax.jit
  def projected_grads(p, batches, anchors, directions):
    """[R + 1, D] projections of every batch's gradient, and batch 0's full gradient."""
    grads = jax.vmap(batch_grad, in_axes=(None, 0, 0))(p, batches, anchors)
    return grads @ directions.T, grads[0]

  g_star, table = exact_grad(theta, ALPHA)
  g_no_mix, _ = exact_grad(theta, 0.0)
  directions = np.concatenate([rng.normal(size=(NUM_RANDOM_DIRECTIONS, flat.size)),
                               np.stack([g_star, g_no_mix - g_star])])
  directions = jnp.asarray(directions / np.linalg.norm(directions, axis=1, keepdims=True),
                           jnp.float32)
  batches = _collect(engine, world, theta, ref, jax.random.key(3))
  proj, g0 = projected_grads(theta, *batches, directions)
  return dict(cfg=cfg, world=world, theta=theta, ref=ref, backend=backend, engine=engine,
              exact_grad=exact_grad, projected_grads=projected_grads, g_star=g_star,
              table=table, directions=directions, batches=batches, proj=proj, g0=g0)


def _z(proj, exact_proj):
  """Per-direction (mean − exact)/stderr over the R batches [R, D]."""
  proj = np.asarray(proj, np.float64)
  err = proj.mean(0) - np.asarray(exact_proj, np.float64)
  return err / (proj.std(0, ddof=1) / np.sqrt(proj.shape[0]))


def test_sampled_gradient_mean_matches_exact_gradient(setup):
  s = setup
  c, k = s["world"].prompt_tokens.shape[0], s["engine"].k
  batch, _ = s["batches"]
  # One round's batch: every prompt K times, unit weights (so Σw = C·K is constant).
  np.testing.assert_array_equal(batch.weight, np.ones((R + 1, c * k)))
  p_len = s["cfg"].testbed.prompt_length
  np.testing.assert_array_equal(batch.tok[0, :, :p_len],
                                np.repeat(s["world"].prompt_tokens, k, 0))
  proj = s["proj"][1:]  # batch 0 makes the stale test's update: R batches here
  z = _z(proj, s["directions"] @ s["g_star"])
  assert np.all(np.abs(z) <= Z_MAX), z
  # The projections are informative: g* is resolved to a few percent.
  g_dir = proj[:, NUM_RANDOM_DIRECTIONS]
  stderr = np.std(g_dir, ddof=1) / np.sqrt(R)
  assert stderr < 0.05 * float(jnp.linalg.norm(s["g_star"])), stderr


def test_opponents_from_the_policy_instead_of_the_mixture_fail(setup):
  s = setup
  cfg = s["cfg"].copy_and_resolve_references()
  cfg.nash_md.alpha = 0.0  # opponents y' ~ π_θ: the target becomes P(y ≻ π_θ)
  batches = _collect(Engine(s["backend"], cfg), s["world"], s["theta"], s["ref"],
                     jax.random.key(4))
  proj, _ = s["projected_grads"](s["theta"], *batches, s["directions"])
  z = _z(proj[1:], s["directions"] @ s["g_star"])
  assert np.max(np.abs(z)) > Z_MAX, z


def test_stale_samples_after_one_update_fail(setup):
  """Samples of θ, gradient at θ₁ = θ after one update, vs the exact gradient at θ₁."""
  s = setup
  batch, anchor = s["batches"]
  # One step of the engine's inner optimizer (Adam, selfplay.learning_rate) on the whole of
  # batch 0, which is independent of the R batches tested below.
  lr = float(s["cfg"].selfplay.learning_rate)
  step, _ = optax.adam(lr).update(s["g0"], optax.adam(lr).init(s["g0"]))
  flat, unravel = ravel_pytree(s["theta"])
  theta1 = unravel(flat + step)
  g1, table1 = s["exact_grad"](theta1, ALPHA)
  kl = float(jnp.mean(jnp.sum(jnp.exp(table1) * (table1 - s["table"]), -1)))
  assert 0 < kl < 0.5, kl  # one small update, yet ...
  proj1, _ = s["projected_grads"](theta1, batch, anchor, s["directions"])
  z = _z(proj1[1:], s["directions"] @ g1)
  assert np.max(np.abs(z)) > Z_MAX, z  # ... stale samples without importance weights are biased
