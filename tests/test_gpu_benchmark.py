"""benchmarks/gpu.py: its flop and byte counts by hand, and its whole path on CPU (`--tiny`).

The script runs where a GPU is lent for a few minutes; this keeps it runnable
between such chances. Tolerances: both sides compute in bfloat16, whose
relative rounding is 2^-8; the kernels' outputs are averages of standard
normal values, below 4 in magnitude, so two bfloat16 roundings apart is at
most 2 · 4 · 2^-8 = 2^-5.
"""

import argparse
import json
import types

import numpy as np
import pytest

from benchmarks import gpu
from benchmarks import sampler as sampler_bench
from benchmarks import timing
from onpo_jax.models import config as config_lib

_CONFIG = config_lib.DecoderConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, tie_word_embeddings=True, dtype="bfloat16",
    param_dtype="bfloat16")


def test_train_flops_count_every_matmul_weight_and_the_causal_attention():
  per_layer_weights = {"q": 64 * 4 * 16, "k": 64 * 2 * 16, "v": 64 * 2 * 16, "o": 4 * 16 * 64,
                       "gate": 64 * 128, "up": 64 * 128, "down": 128 * 64}
  weights = 2 * sum(per_layer_weights.values()) + 512 * 64  # + the unembedding
  assert gpu.matmul_weights(_CONFIG) == weights
  length = 10
  # Query i (0-based) sees i + 1 keys: q·k and p·v each 2 · head_dim flops per key and
  # head forward, twice that backward.
  attention = sum(3 * 2 * 2 * 16 * 4 * (i + 1) for i in range(length)) / length * 2
  assert gpu.train_flops_per_token(_CONFIG, length) == pytest.approx(6 * weights + attention,
                                                                    rel=1e-12)


def test_decode_reads_every_weight_and_the_filled_cache_slots():
  weights = gpu.matmul_weights(_CONFIG) * 2
  cache = 2 * 2 * (2 * 16) * 2 * 3 * 5.5  # layers, k and v, kv heads x d, bytes, batch, slots
  assert gpu.decode_read_bytes(_CONFIG, 3, 5.5) == weights + cache


def test_nominal_peaks_by_device_kind():
  assert gpu.nominal_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert gpu.nominal_peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert gpu.nominal_peak_tflops("NVIDIA H200") == 989.4
  assert gpu.nominal_peak_tflops("TPU v5 lite") == 197.0
  assert gpu.nominal_peak_tflops("cpu") is None


def test_bad_flags_are_named(capsys):
  for flags, named in ((["--decode-batches", "1,x"], "--decode-batches"),
                       (["--decode-batches", "0"], "--decode-batches"),
                       (["--eos-check-every", "1,y"], "--eos-check-every"),
                       (["--eos-check-every", "0"], "--eos-check-every"),
                       (["--phases", "decode,sampling"], "--phases"),
                       (["--phases", ""], "--phases"),
                       (["--train-len", "0"], "--train-len"),
                       (["--hidden", "100", "--heads", "32"], "--hidden 100")):
    with pytest.raises(SystemExit):
      gpu.parse_args(flags)
    assert named in capsys.readouterr().err


def test_phases_run_in_order_with_the_peaks_they_read():
  assert gpu.parse_args([]).phases == list(gpu.PHASES)
  assert gpu.parse_args(["--phases", "decode"]).phases == ["peaks", "decode"]
  assert gpu.parse_args(["--phases", "attention,train"]).phases == ["peaks", "train", "attention"]
  assert gpu.parse_args(["--phases", "attention"]).phases == ["attention"]


def test_decoding_step_is_the_fastest_n_token_call_less_the_fastest_one_token_call():
  # 9 new tokens: 8 cached steps of 2 ms; the slow calls are the noise a shared machine adds.
  assert sampler_bench.decode_step_ms([0.040, 0.026, 0.031], [0.011, 0.010], 9) == (
      pytest.approx(2.0, rel=1e-12))
  # The one-token run came out slower than the 9-token run: no estimate, not a negative time.
  assert sampler_bench.decode_step_ms([0.026], [0.030, 0.027], 9) is None
  assert sampler_bench.decode_step_ms([0.026], [0.026], 9) is None


def test_paired_calls_alternate_their_order_and_keep_the_pairs():
  order, after = [], []
  a, b = (lambda: order.append("a")), (lambda: order.append("b"))
  (a_first, a_walls, a_cpus), (b_first, b_walls, b_cpus) = timing.paired_calls(
      a, b, 3, after_a=after.append)
  # First (untimed) calls, then pairs a b, b a, a b.
  assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
  assert len(a_walls) == len(b_walls) == len(a_cpus) == len(b_cpus) == 3
  assert after == a_walls  # after_a sees each timed call of a, in order
  assert min(a_first, b_first, *a_walls, *b_walls) >= 0


def test_decode_rows_use_the_decoding_step_and_name_the_unresolved_one(monkeypatch):
  """bench_decode on made-up call times: each side's step, its share of the bound, the row text."""
  walls = {("jax", 5): [0.020, 0.018], ("jax", 1): [0.006, 0.010],  # 4 steps of 3 ms
           ("torch", 5): [0.030, 0.050], ("torch", 1): [0.031, 0.040]}  # noise: no estimate

  # With an EOS checked every 2 steps: 4 steps of 3.5 ms.
  walls.update({("jax every 2", 5): [0.022, 0.020], ("jax every 2", 1): [0.007, 0.006]})

  def fake(side):
    def times(args, model, tokens, mask, new_tokens, eos_check_every=None, trace_dir=""):
      name = side if eos_check_every is None else f"{side} every {eos_check_every}"
      return 1.0, walls[name, new_tokens], [0.1, 0.1]
    return times

  monkeypatch.setattr(sampler_bench, "_jax_sampling_time", fake("jax"))
  monkeypatch.setattr(sampler_bench, "_torch_sampling_time", fake("torch"))
  args = argparse.Namespace(decode_batches=[2], prompt_len=6, new_tokens=5, torch_device="cpu",
                            eos_check_every=[2], trace_dir="")
  rows = gpu.bench_decode(args, None, types.SimpleNamespace(config=_CONFIG), {"read_gb_s": 10.0},
                          np.random.default_rng(0))
  row = rows[2]
  assert row["tokens_per_s"] == {"jax": pytest.approx(2 * 5 / 0.019),
                                 "torch": pytest.approx(2 * 5 / 0.040)}
  assert row["step_ms"] == {"jax": pytest.approx(3.0, rel=1e-12), "torch": None}
  assert row["of_bound"] == {"jax": pytest.approx(row["bound_ms"] / 3.0, rel=1e-12),
                             "torch": None}
  assert row["jax_step_ms_eos_checked"] == {"2": pytest.approx(3.5, rel=1e-12)}
  line = gpu.decode_line(2, row)
  assert "3.00 / noise" in line and "n/a" in line


def test_tiny_run_on_cpu_measures_every_part(tmp_path, capsys):
  out = tmp_path / "gpu.json"
  gpu.main(["--tiny", "--torch-device", "cpu", "--repeats", "1", f"--out={out}",
            f"--trace-dir={tmp_path / 'trace'}"])
  r = json.loads(out.read_text())
  printed = capsys.readouterr().out
  assert r["parity_max_abs_logit_diff"] < 2 ** -5 * 8  # logits reach about 8 in magnitude
  assert r["peaks"]["nominal_tflops"] is None and r["peaks"]["gemm_tflops"] > 0
  assert r["peaks"]["read_gb_s"] > 0
  for side in ("jax", "torch"):
    t = r["train"][side]
    assert t["tokens_per_s"] > 0 and t["mfu_nominal"] is None
    assert t["model_tflops"] == pytest.approx(
        r["train"]["model_tflop_per_step"] / t["step_s"], rel=1e-9)
  assert r["train"]["tokens_per_step"] == 2 * 32
  assert set(r["decode"]) == {"1", "4"}
  for row in r["decode"].values():
    # A decoding step is a difference of two timings: None where noise hid it.
    assert row["bound_ms"] > 0 and all(ms is None or ms > 0 for ms in row["step_ms"].values())
    assert set(row["jax_step_ms_eos_checked"]) == {"1", "8"}
    assert all(ms is None or ms > 0 for ms in row["jax_step_ms_eos_checked"].values())
    assert min(row["tokens_per_s"].values()) > 0
  assert set(r["attention"]) == set(gpu.IMPLS)
  for impl, row in r["attention"].items():
    assert row["max_abs_diff_vs_dense"] <= 2 ** -5, impl
    assert not row["cudnn_fused"]  # no cuDNN on CPU
  assert "jax / torch" in printed and "of bound" in printed and "cuDNN fused" in printed
  assert "batch 4, jax decoding step with an EOS id checked every 1: " in printed
  for batch in (1, 4):  # one traced sampling call per batch size
    assert list((tmp_path / "trace" / f"decode_batch{batch}").glob("**/*.xplane.pb"))


def test_a_run_of_one_phase_measures_only_that_phase(tmp_path):
  out = tmp_path / "gpu.json"
  results = gpu.main(["--tiny", "--torch-device", "cpu", "--repeats", "1", "--phases",
                      "attention", f"--out={out}"])
  assert json.loads(out.read_text()) == results
  assert set(results) == {"args", "parity_max_abs_logit_diff", "attention"}
  assert set(results["attention"]) == set(gpu.IMPLS)


def test_a_failing_phase_is_recorded_and_the_next_one_still_runs(tmp_path, capsys):
  out = tmp_path / "gpu.json"
  shown, results = [], {}

  def broken():
    raise RuntimeError("CUDA out of memory")

  def unprintable(row):
    raise KeyError("tok/s")

  failed = gpu.run_phases(
      argparse.Namespace(out=str(out)), results,
      (("a", lambda: {"x": 1}, shown.append), ("b", broken, shown.append),
       ("c", lambda: {"y": results["a"]["x"] + 1}, shown.append),
       ("d", lambda: {"z": 3}, unprintable)))
  assert failed == ["b", "d"]
  assert shown == [{"x": 1}, {"y": 2}]
  assert results["b"] == {"error": "RuntimeError: CUDA out of memory"}
  # Measured but not printed: the numbers stay, the error beside them.
  assert results["d"] == {"z": 3, "error": "KeyError: 'tok/s'"}
  # What each phase measured is on disk once it ends, the failure included.
  assert json.loads(out.read_text()) == results
  assert "CUDA out of memory" in capsys.readouterr().err
