"""LoRA vs full-parameter ONPO in the testbed's exact mode, over seeds.

Each seed plays its own exact-mode game (`exact_part.exact_config`: V = 2,
L = 3, 2 prompts) from its SFT start; ONPO two_step runs T exact rounds with
full-parameter training and with LoRA (`testbed.lora_exact`) of each rank, all
seeds in one vmapped solve per variant. Per seed it records, over rounds 1..T,
the largest |π_LoRA − π_full| of any table entry, the largest KL(network ‖
tabular shadow) and the largest regression residual, and prints the mean over
seeds with a 95% Student-t interval (`infra.stats.mean_ci`).

Variants: 'full' (every parameter), 'F+rest' (full-rank LoRA on the seven
projections plus full training of embeddings, norms and lm_head: PEFT's
modules_to_save), 'r+rest' for each --ranks, and 'F' (full-rank LoRA on the
projections only), whose frozen final norm and lm_head bound every token
log-probability from below (`lora_exact.frozen_head_floor`), a floor the
shadow's tables cross within a few rounds.

    python -m benchmarks.lora_testbed                      # 5 seeds, T = 6
    python -m benchmarks.lora_testbed --seeds 3 --rounds 3 --ranks 1
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from configs import default as default_config
from onpo_jax.infra import metrics as metrics_lib
from onpo_jax.infra import stats
from onpo_jax.testbed import exact_part
from onpo_jax.testbed import lora_exact


def _variant(name: str, params):
  """(LoraConfig or None, train_rest) of a variant name."""
  if name == "full":
    return None, False
  rank, _, rest = name.partition("+")
  cfg = (lora_exact.full_rank_config(params) if rank == "F"
         else lora_exact.rank_config(int(rank)))
  return cfg, rest == "rest"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seeds", type=int, default=5, help="games (at least 2 for an interval)")
  ap.add_argument("--rounds", type=int, default=6, help="T: exact ONPO rounds")
  ap.add_argument("--ranks", type=int, nargs="*", default=[1, 2], help="small ranks (with rest)")
  ap.add_argument("--residual-tol", type=float, default=1e-12,
                  help="each regression's excess-loss tolerance")
  ap.add_argument("--max-steps", type=int, default=600, help="Gauss-Newton steps per regression")
  ap.add_argument("--no-projections-only", action="store_true",
                  help="skip the full-rank projections-only variant 'F'")
  args = ap.parse_args(argv)

  cfg = default_config.get_config()
  cfg.seeds = args.seeds
  t_rounds = args.rounds
  kw = dict(tol=1e-14, max_steps=args.max_steps, residual_tol=args.residual_tol, stall_steps=20)
  names = ["full", "F+rest"] + [f"{r}+rest" for r in args.ranks]
  if not args.no_projections_only:
    names.append("F")
  rows, full_tables = [], None
  with exact_part.exact_precision(cfg):
    t0 = time.perf_counter()
    starts = exact_part.exact_starts(cfg)
    print(f"{args.seeds} SFT starts in {time.perf_counter() - t0:.0f} s")
    ec = exact_part.exact_config(cfg, 0)
    graphdef = starts[0].world.graphdef
    ys = np.asarray(starts[0].world.responses)
    floor = np.array([lora_exact.frozen_head_floor(s.sft_params) for s in starts])
    for name in names:
      t0 = time.perf_counter()
      lcfg, rest = _variant(name, starts[0].sft_params)
      runner = lora_exact.TableRounds(ec, graphdef, lora_config=lcfg, train_rest=rest, **kw)
      outs = runner.run(starts, "onpo_two_step", t_rounds, key=jax.random.key(1))
      tables = np.stack([o["tables"] for o in outs])  # [S, T+1, C, |Y|]
      if name == "full":
        full_tables = tables
        shadow_min = np.stack([lora_exact.min_token_logprob(o["shadow"], ys, 2) for o in outs])
      diff = lora_exact.max_prob_diff(tables, full_tables)[:, 1:].max(axis=1)
      kl = np.stack([np.abs(o["tracking_kl"][1:]).max() for o in outs])
      res = np.stack([o["residual"].max() for o in outs])
      steps = np.stack([o["steps"].mean() for o in outs])
      ci = lambda x: "{:.2e} ± {:.1e}".format(*stats.mean_ci(x, 0.95))
      rows.append([name, ci(diff), ci(kl), f"{res.max():.1e}", f"{steps.mean():.0f}",
                   f"{time.perf_counter() - t0:.0f}"])
      print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
  print(f"\nONPO two_step, exact mode, {args.seeds} games, T = {t_rounds}, float64, residual "
        f"tol {args.residual_tol:g} (mean ± 95% t-interval half-width over games):")
  print(metrics_lib.format_table(
      rows, ["variant", "max |Δπ| vs full", "max KL(net ‖ shadow)", "worst residual",
             "GN steps/round", "time s"]))
  first = [int(np.argmax(m < f)) if np.any(m < f) else -1 for m, f in zip(shadow_min, floor)]
  print("\nFrozen final norm + lm_head: lowest token log-prob any projections-only LoRA can give "
        f"(per game) {np.round(floor, 2).tolist()}; the shadow's lowest token log-prob by round "
        f"{t_rounds}: {np.round(shadow_min[:, -1], 2).tolist()}; first round below the floor "
        f"(-1: none): {first}")


if __name__ == "__main__":
  main()
