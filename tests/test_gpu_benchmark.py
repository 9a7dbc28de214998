"""benchmarks/gpu.py: its flop and byte counts by hand, and its whole path on CPU (`--tiny`).

The script runs where a GPU is lent for a few minutes; this keeps it runnable
between such chances. Tolerances: both sides compute in bfloat16, whose
relative rounding is 2^-8; the kernels' outputs are averages of standard
normal values, below 4 in magnitude, so two bfloat16 roundings apart is at
most 2 · 4 · 2^-8 = 2^-5.
"""

import json

import pytest

from benchmarks import gpu
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
                       (["--train-len", "0"], "--train-len"),
                       (["--hidden", "100", "--heads", "32"], "--hidden 100")):
    with pytest.raises(SystemExit):
      gpu.parse_args(flags)
    assert named in capsys.readouterr().err


def test_tiny_run_on_cpu_measures_every_part(tmp_path, capsys):
  out = tmp_path / "gpu.json"
  gpu.main(["--tiny", "--torch-device", "cpu", "--repeats", "1", f"--out={out}"])
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
    assert row["bound_ms"] > 0 and min(row["step_ms"].values()) > 0
    assert min(row["tokens_per_s"].values()) > 0
  assert set(r["attention"]) == set(gpu.IMPLS)
  for impl, row in r["attention"].items():
    assert row["max_abs_diff_vs_dense"] <= 2 ** -5, impl
    assert not row["cudnn_fused"]  # no cuDNN on CPU
  assert "jax / torch" in printed and "of bound" in printed and "cuDNN fused" in printed
