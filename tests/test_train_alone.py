"""benchmarks/train_alone.py: one process per side and round, and the summary over rounds."""

import numpy as np
import pytest

from benchmarks import sampler
from benchmarks import train_alone
from benchmarks import weights

_TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
         "--intermediate", "64", "--vocab", "96", "--train-batch", "2", "--train-len", "8",
         "--repeats", "1"]


def test_rounds_alternate_the_first_side_and_pass_the_options_on(monkeypatch, capsys):
  calls = []
  def jax(wall, share):
    return dict(wall=wall, cpu=0, gflops=wall / 10, peak_share=share, peak=200.0)

  rates = {"jax": {"token_logprobs": jax(300.0, 0.7), "full_logits": jax(200.0, 0.6),
                   "response_logprobs": jax(150.0, 0.5)},
           "torch": {"token_logprobs": dict(wall=100.0, cpu=0), "full_logits": dict(wall=100.0, cpu=0),
                     "response_logprobs": dict(wall=150.0, cpu=0)}}

  def fake_run_side(side, rest, checkpoint):
    calls.append((side, tuple(rest), checkpoint))
    return rates[side], 1.0, [f"settings of {side}"]

  monkeypatch.setattr(train_alone, "_run_side", fake_run_side)
  train_alone.main(["--rounds", "3", *_TINY])
  assert [side for side, _, _ in calls] == ["jax", "torch", "torch", "jax", "jax", "torch"]
  assert {rest for _, rest, _ in calls} == {tuple(_TINY)}  # --rounds stays with the parent
  assert len({checkpoint for _, _, checkpoint in calls}) == 1  # one set of weights
  out = capsys.readouterr().out
  assert out.count("settings of") == 1 and "settings of jax" in out  # the first process's
  assert ("round 2/3 (torch first, 2 s): token_logprobs 300 / 100 = 3.00 "
          "(jax 30 GFLOP/s, 70% of 200)") in out
  # Every round gives the same ratio: a zero-width interval.
  assert "token_logprobs: jax / torch over 3 rounds: 3.00 ± 0.00" in out
  assert "full_logits: jax / torch over 3 rounds: 2.00 ± 0.00" in out
  assert "response_logprobs: jax / torch over 3 rounds: 1.00 ± 0.00" in out
  assert ("token_logprobs: jax, % of the float32 GEMM peak probed after each call (median per "
          "round) over 3 rounds: 70.0 ± 0.0 [70.0, 70.0] (per round 70.0, 70.0, 70.0)") in out


def test_summary_is_the_t_interval_of_the_ratios_and_of_their_logs():
  # Two rounds: t(0.975, 1) = 12.706; ratios 1 and 2: sd 0.7071, log sd 0.4901.
  text = train_alone.summarise([1.0, 2.0])
  half = 12.7062 * np.std([1.0, 2.0], ddof=1) / np.sqrt(2)
  log_half = 12.7062 * np.std(np.log([1.0, 2.0]), ddof=1) / np.sqrt(2)
  assert text.startswith(f"1.50 ± {half:.2f} [{1.5 - half:.2f}, {1.5 + half:.2f}]")
  g = np.sqrt(2.0)
  assert text.endswith(f"geometric mean {g:.2f} [{g * np.exp(-log_half):.2f}, "
                       f"{g * np.exp(log_half):.2f}]")


def test_one_round_is_refused_and_help_names_both_sets_of_options(capsys):
  with pytest.raises(SystemExit):
    train_alone.parse_args(["--rounds", "1"])
  assert "--rounds: expected at least 2" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    train_alone.main(["--help"])
  out = capsys.readouterr().out
  assert "--rounds" in out and "--train-batch" in out and "--gguf" in out


def test_each_side_times_its_own_steps_on_the_written_weights(tmp_path, monkeypatch):
  args = sampler.parse_args(_TINY)
  weights.write_checkpoint(args, str(tmp_path))
  peaks, real_probe = [], sampler.gemm_probe

  def recorded_probe(dtype):
    probe = real_probe(dtype)
    return lambda: peaks.append(probe()) or peaks[-1]

  monkeypatch.setattr(sampler, "gemm_probe", recorded_probe)
  jax_rates = train_alone.time_side("jax", args, str(tmp_path))
  torch_rates = train_alone.time_side("torch", args, str(tmp_path))
  for rates in (jax_rates, torch_rates):
    assert set(rates) == set(train_alone.VARIANTS)
    assert all(r["wall"] > 0 and r["cpu"] > 0 for r in rates.values())
  # One timed call per JAX step (--repeats 1), each followed by one probe: the step's
  # share is its GFLOP/s over the peak probed after it.
  assert [r["peak"] for r in jax_rates.values()] == peaks and all(p > 0 for p in peaks)
  for r in jax_rates.values():
    assert r["gflops"] > 0
    assert r["peak_share"] == pytest.approx(r["gflops"] / r["peak"], rel=1e-12)
  # torch has one every-position step: its full_logits row is that step.
  assert torch_rates["full_logits"] == torch_rates["token_logprobs"]
