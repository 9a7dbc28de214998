"""The claims the exact testbed makes, pinned as tests rather than as floats.

1. Tracking: on the default config's exact world, the neural exact rounds of
   ONPO (two_step), OMD and INPO stay within `exact.tracking_kl_bound` of their
   tabular shadows at every round (`trajectories.ExactRounds`, the engine's own
   path). A negative control shows the check can fail: with a constant prompt
   the decoder cannot represent the step (`testbed.env.make_prompts`).
2. Statistics over the default games (on the tabular shadows, which item 1
   ties to the neural runs): ONPO's average-iterate gap falls with a fitted
   log-log slope whose 95% interval lies below zero, and ONPO ends below INPO
   (whose KL term stops it at a regularised equilibrium) with a difference
   Welch's test supports, and below OMD on every game with a difference the
   paired test (over the same games) supports. These are the statements the
   README makes; they must hold on any CPU, so they are written as intervals,
   not as digits.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from onpo_jax.infra import stats
from onpo_jax.testbed import exact_part
from onpo_jax.testbed import shadow
from onpo_jax.testbed import world as world_lib
from onpo_jax.testbed.world import Testbed

TRACKED = ("onpo_two_step", "omd", "inpo")
ROUNDS = 6
SEEDS = 2


@pytest.fixture(scope="module")
def exact_world():
  cfg = default_config.get_config()
  cfg.seeds = SEEDS
  with exact_part.exact_precision(cfg):  # the job's exact rounds: its dtype, solver and budgets
    starts = exact_part.exact_starts(cfg)
    rounds = exact_part.exact_rounds(cfg, starts[0].world.graphdef)
  return cfg, starts, rounds


@pytest.mark.parametrize("name", TRACKED)
def test_neural_exact_rounds_track_their_tabular_shadows(exact_world, name):
  cfg, starts, rounds = exact_world
  bound = cfg.exact.tracking_kl_bound
  with exact_part.exact_precision(cfg):
    outs = rounds.run(starts, name, ROUNDS)
  for s, out in enumerate(outs):
    kl = np.abs(out["tracking_kl"])
    print(f"{name} seed {s}: max |KL| {kl.max():.2e} (bound {bound:g}), max residual "
          f"{out['residual'].max():.2e}, steps per round {out['steps'].mean():.1f}")
    assert kl.max() <= bound, (name, s, kl)
    # Tracking shows in what is reported, too: the neural gaps are the shadow's.
    np.testing.assert_allclose(out["avg_gap"], out["shadow_avg_gap"], atol=0.01 * 0.5, rtol=0)


def test_a_constant_prompt_breaks_tracking(exact_world):
  # Negative control: with the prompt (0, 0, 0) every position of "prompt +
  # response 0…0" has the same hidden state, so the conditionals of 0, 00, 000
  # are tied and the round's step is not representable.
  cfg, starts, rounds = exact_world
  ec = exact_part.exact_config(cfg, 0)
  with exact_part.exact_precision(cfg):
    world = Testbed(ec)
    world.prompt_tokens = np.zeros_like(world.prompt_tokens)
    world.prompt_tokens[1, -1] = 1
    world.inputs = (world.prompt_tokens, world.prompt_mask, world.inputs[2])
    start = world_lib.sft_start(ec, world)
    out = rounds.run([start], "omd", 2)[0]
  print(f"constant prompt: max |KL| {np.abs(out['tracking_kl']).max():.2e}")
  assert np.abs(out["tracking_kl"]).max() > 10 * cfg.exact.tracking_kl_bound


def test_default_games_show_the_rates_the_readme_states():
  cfg = default_config.get_config()
  t = cfg.exact.num_rounds
  avg = {m: [] for m in ("onpo_two_step", "inpo", "omd")}
  with exact_part.exact_precision(cfg):
    for s, start in enumerate(exact_part.exact_starts(cfg)):
      ec = exact_part.exact_config(cfg, s)
      for m in avg:
        it = shadow.shadow_iterates(m, ec, start.world.pref, start.sft_table, t)
        avg[m].append(np.asarray(shadow.iterate_gaps(start.world.pref, it)["avg_gap"]))
  onpo = np.stack(avg["onpo_two_step"])
  slope = stats.slope_ci(np.arange(1, t + 2), onpo, 0.95)
  print(f"ONPO average-iterate slope over {t} rounds: {slope.slope:.3f} ± {slope.half_width:.3f}")
  assert slope.slope + slope.half_width < 0
  d = stats.differs(onpo[:, -1], np.stack(avg["inpo"])[:, -1], 0.95)
  print(f"ONPO − INPO final average-iterate gap: {d.diff:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")
  assert d.significant and d.diff < 0
  omd = np.stack(avg["omd"])
  assert np.all(onpo[:, -1] < omd[:, -1])
  d = stats.differs(onpo[:, -1], omd[:, -1], 0.95, paired=True)
  print(f"ONPO − OMD final average-iterate gap, paired: {d.diff:+.4f} "
        f"[{d.low:+.4f}, {d.high:+.4f}], p = {d.p_value:.3g}")
  assert d.significant and d.diff < 0
  assert jnp.all(jnp.isfinite(onpo))
