"""Train-step tokens/s of onpo_jax (JAX) and of PyTorch, each side in a process of its own.

`sampler.py` times both sides in one process. They share its malloc and its
memory, and one side's calls change the other's speed: with their calls
alternating in that process (`sampler.py --train-pairs`), torch's step ran
faster and JAX's response-only step a third slower than when each side's
calls ran in a row (benchmarks/README.md). Here each round starts one fresh
process per side, in alternating order (JAX first in odd rounds, torch first
in even ones), on the same weights (one HF checkpoint written by this
process); each times only its own steps, as `sampler.py` does (the same
steps, `train_step.py`; first call excluded, median of `--repeats`). A
round's ratio compares two runs a minute apart, each alone on the machine.

Prints each round's tokens/s and ratios as it ends, then per step the mean
ratio over rounds with its 95% t interval, and the geometric mean with the
interval of the mean log ratio. The JAX process also follows each timed call
with `sampler.gemm_probe` (outside the timing) and reports the step's GFLOP/s
(XLA's flop count / wall) as a share of the float32 GEMM peak measured right
after that call: the median per round, then its mean over rounds.

Run (the model and step options are `sampler.py`'s):
  python -m benchmarks.train_alone --threads 2 --rounds 8     # benchmark model, 8 x 128
  python -m benchmarks.train_alone --threads 2 --rounds 4 --gguf smollm2 --train-batch 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np
import scipy.stats

from benchmarks import host_devices
from benchmarks import sampler
from benchmarks import train_step
from benchmarks import weights

# JAX losses: (full_logits, response only); see sampler.bench_training.
VARIANTS = {"token_logprobs": (False, False), "full_logits": (True, False),
            "response_logprobs": (False, True)}
_RESULT = "train_alone result: "


def parse_args(argv):
  """(this script's options, the sampler options passed on to each side's process)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], add_help=False)
  p.add_argument("--rounds", type=int, default=6, help="processes per side")
  p.add_argument("--side", choices=("jax", "torch"), default=None,
                 help="(internal) time this side on the weights in --checkpoint")
  p.add_argument("--checkpoint", default=None, help="(internal) HF checkpoint directory")
  own, rest = p.parse_known_args(argv)
  if {"-h", "--help"} & set(rest):  # sampler.parse_args prints the rest and exits
    p.print_help()
    print("\nmodel and step options (those of benchmarks.sampler):")
  if own.rounds < 2:
    p.error(f"--rounds: expected at least 2 (an interval needs two rounds), got {own.rounds}")
  return own, rest


def time_side(side, args, checkpoint):
  """{step: rates} of one side's train steps on `checkpoint`.

  rates: 'wall' and 'cpu' tokens/s (median of `--repeats` calls); for JAX also
  'gflops' (XLA's flop count of the step over the median wall time) and
  'peak_share' / 'peak', the medians over calls of the call's GFLOP/s over the
  GEMM peak probed right after it, and of that peak.
  """
  rng = np.random.default_rng(args.seed)
  if side == "jax":
    mesh = host_devices.mesh(args)
    model = host_devices.replicate(weights.load_jax_model(args, checkpoint), mesh)
    probe = sampler.gemm_probe(args.jax_dtype)
  else:
    model = weights.load_torch_model(args, checkpoint)
  tokens, attn, resp = train_step.train_batch(args, model.config.vocab_size, rng)
  start = args.train_len // 2
  out = {}
  for name, (full_logits, response_only) in VARIANTS.items():
    first = start if response_only else 1
    if side == "jax":
      probed = []
      (_, wall, cpu), flops = train_step.jax_train_timing(
          model, tokens, attn, resp, full_logits, args.repeats, first,
          after=lambda seconds, probed=probed: probed.append((seconds, probe())), mesh=mesh)
      shares = [flops / seconds / 1e9 / peak for seconds, peak in probed]
      extra = dict(gflops=flops / wall / 1e9, peak_share=float(np.median(shares)),
                   peak=float(np.median([peak for _, peak in probed])))
    elif full_logits:
      continue  # torch's every-position step is timed once, as "token_logprobs"
    else:
      _, wall, cpu = train_step.torch_train_timing(model, tokens, resp, args.repeats, first)
      extra = {}
    out[name] = dict(wall=tokens.size / wall, cpu=tokens.size / cpu, **extra)
  if side == "torch":
    out["full_logits"] = out["token_logprobs"]
  return out


def _run_side(side, rest, checkpoint):
  """Starts this script for one side: (its result, the seconds it took, the settings it printed)."""
  t0 = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.train_alone", *rest, "--side", side, "--checkpoint",
       checkpoint], capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_RESULT)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"the {side} process failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  settings = [l for l in proc.stdout.splitlines() if not l.startswith(_RESULT)]
  return json.loads(lines[-1][len(_RESULT):]), time.perf_counter() - t0, settings


def _t_interval(values):
  """(mean, half-width of its 95% t interval) of per-round values."""
  x = np.asarray(values, float)
  return x.mean(), scipy.stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))


def summarise(ratios):
  """'mean ± half-width [lo, hi]; geometric mean g [lo, hi]' of per-round ratios (95% t)."""
  m, h = _t_interval(ratios)
  lm, hl = _t_interval(np.log(ratios))
  return (f"{m:.2f} ± {h:.2f} [{m - h:.2f}, {m + h:.2f}]; geometric mean "
          f"{np.exp(lm):.2f} [{np.exp(lm - hl):.2f}, {np.exp(lm + hl):.2f}]")


def main(argv=None):
  own, rest = parse_args(sys.argv[1:] if argv is None else argv)
  args = sampler.parse_args(rest)
  if own.side is not None:
    sampler.setup_process(args)
    print(_RESULT + json.dumps(time_side(own.side, args, own.checkpoint)), flush=True)
    return
  print(f"train step {args.train_batch}x{args.train_len} tokens, Adam, "
        f"{own.rounds} rounds of one process per side; tokens/s (wall), ratio = jax / torch",
        flush=True)
  ratios = {name: [] for name in VARIANTS}
  shares = {name: [] for name in VARIANTS}
  with tempfile.TemporaryDirectory() as checkpoint:
    weights.write_checkpoint(args, checkpoint)
    for r in range(own.rounds):
      order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
      results, seconds = {}, 0.0
      for side in order:
        results[side], s, settings = _run_side(side, rest, checkpoint)
        seconds += s
        if r == 0 and side == order[0]:
          print("\n".join(settings), flush=True)  # the settings both sides run under
      cells = []
      for name in VARIANTS:
        ours, peer = results["jax"][name], results["torch"][name]
        ratios[name].append(ours["wall"] / peer["wall"])
        shares[name].append(100 * ours["peak_share"])
        cells.append(f"{name} {ours['wall']:.0f} / {peer['wall']:.0f} = {ratios[name][-1]:.2f} "
                     f"(jax {ours['gflops']:.0f} GFLOP/s, {shares[name][-1]:.0f}% of "
                     f"{ours['peak']:.0f})")
      print(f"round {r + 1}/{own.rounds} ({order[0]} first, {seconds:.0f} s): "
            + "; ".join(cells), flush=True)
  for name, x in ratios.items():
    print(f"{name}: jax / torch over {own.rounds} rounds: {summarise(x)} "
          f"(per round {', '.join(f'{v:.2f}' for v in x)})")
  for name, x in shares.items():
    m, h = _t_interval(x)
    print(f"{name}: jax, % of the {args.jax_dtype} GEMM peak probed after each call (median per "
          f"round) over {own.rounds} rounds: {m:.1f} ± {h:.1f} [{m - h:.1f}, {m + h:.1f}] "
          f"(per round {', '.join(f'{v:.1f}' for v in x)})")


if __name__ == "__main__":
  main()
