"""An accelerator's numbers in one run: train-step MFU, decoding against HBM, attention kernels.

Measures, on JAX's default device with the torch peer on `--torch-device`,
both sides at the same precision and with the same weights (a random
transformers Llama, Llama-3.2-1B's shapes by default, imported with
`onpo_jax.models.load_hf_checkpoint`):
  * the train step (forward + backward + Adam on the sequence log-prob loss of
    `train_step.py`, `Decoder.token_logprobs`) against PyTorch eager: tokens/s
    and model FLOP utilisation (MFU), i.e. model flops per second over the
    device's nominal dense peak in the model's dtype (`NOMINAL_PEAK_TFLOPS`,
    or `--peak-tflops`), and over the GEMM peak the same run measures;
  * sampling (`onpo_jax.sampler.Sampler` against `model.generate`) at each
    `--decode-batches` size: tokens/s, and the decoding step without the
    prefill against its memory bound, the time to read every weight and the
    filled part of the KV cache once at the measured read bandwidth; then
    JAX's step again with an EOS id checked every k steps (`--eos-check-every`,
    `SamplingConfig.eos_check_every`: on a GPU each check waits for the device);
  * the attention kernels (`attention_impl`): forward + backward time of one
    causal self-attention at the train step's shape, agreement with the dense
    kernel, and whether cuDNN's fused kernel was compiled in.

Model flops per trained token: 6 per matmul weight (q, k, v, o, MLP and the
unembedding; the embedding lookup is no matmul) plus, per layer, 12 · heads
· head_dim · (L + 1) / 2 for the causal attention's two products (forward and
backward, each query seeing (L + 1) / 2 keys on average). Rematerialisation
is not counted: MFU is the useful fraction of the peak.

JAX and torch share the device: JAX is held to `XLA_PYTHON_CLIENT_MEM_FRACTION`
(0.45 unless set) of a GPU's memory instead of preallocating 75% of it.

Run (a GPU machine; prints a table and writes every number to --out):
  python -m benchmarks.gpu --out benchmarks/results/gpu_h100.json
  python -m benchmarks.gpu --tiny --torch-device cpu   # the whole path on CPU, seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import peaks as peaks_lib  # noqa: E402
from benchmarks import sampler as bench  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks import train_step  # noqa: E402
from benchmarks import weights  # noqa: E402
from onpo_jax.models import attention as attention_lib  # noqa: E402

# Dense bfloat16 TFLOP/s from the vendors' data sheets (no sparsity), by a part of
# `jax.Device.device_kind`; the first match counts, so the variants come first.
NOMINAL_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
    ("H800", 989.4), ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v6", 918.0), ("TPU v4", 275.0),
)
IMPLS = ("dense", "chunked", "dot_product_attention")
PHASES = ("peaks", "train", "decode", "attention")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  bench.add_model_args(p)
  p.set_defaults(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                 tie_embeddings=True)  # Llama-3.2-1B
  p.add_argument("--untied", dest="tie_embeddings", action="store_false",
                 help="separate embedding and unembedding tables (default: tied, as Llama-3.2-1B)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="param and compute dtype of both sides")
  p.add_argument("--train-batch", type=int, default=4)
  p.add_argument("--train-len", type=int, default=2048)
  p.add_argument("--attention-impl", default="dot_product_attention", choices=IMPLS,
                 help="the JAX model's attention kernel in the train step and the prefill")
  p.add_argument("--remat", action="store_true", help="rematerialise each block (nnx.remat)")
  p.add_argument("--decode-batches", default="1,64")
  p.add_argument("--eos-check-every", default="1,8",
                 help="also time JAX's decoding step with an EOS id checked every k steps, for "
                      "each k in this comma-separated list ('' for none; the main rows sample "
                      "fixed-length responses, a loop without checks)")
  p.add_argument("--prompt-len", type=int, default=128, help="longest prompt (left-padded)")
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu")
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="the device's dense peak in --dtype (0: NOMINAL_PEAK_TFLOPS by device kind)")
  p.add_argument("--tiny", action="store_true",
                 help="a 2-layer d=64 model and short sequences: checks the whole path in seconds")
  p.add_argument("--phases", default=",".join(PHASES),
                 help=f"comma-separated subset of {','.join(PHASES)} to run, in that order (train "
                      "and decode need peaks, which then runs too); a short lease runs what it "
                      "needs")
  p.add_argument("--trace-dir", default="",
                 help="also trace one JAX sampling call per decoding batch size into "
                      "DIR/decode_batch<B> (jax.profiler: each kernel's device time)")
  p.add_argument("--out", default="", help="JSON file for every number printed")
  args = p.parse_args(argv)
  phases = set(args.phases.split(",")) - {""}
  if not phases or phases - set(PHASES):
    p.error(f"--phases: expected a comma-separated subset of {PHASES}, got {args.phases!r}")
  if phases & {"train", "decode"}:
    phases.add("peaks")
  args.phases = [name for name in PHASES if name in phases]
  if args.tiny:
    args.layers, args.hidden, args.heads, args.kv_heads = 2, 64, 4, 2
    args.intermediate, args.vocab = 128, 512
    args.train_batch, args.train_len, args.prompt_len, args.new_tokens = 2, 32, 8, 16
    args.decode_batches = "1,4"
  for name in ("decode_batches", "eos_check_every"):
    text = getattr(args, name)
    try:
      setattr(args, name, [int(b) for b in text.split(",")] if text else [])
    except ValueError:
      p.error(f"--{name.replace('_', '-')}: expected comma-separated integers, got {text!r}")
  for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "train_batch",
               "train_len", "prompt_len", "new_tokens", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
  if not args.decode_batches or min(args.decode_batches) < 1:
    p.error(f"--decode-batches: expected sizes >= 1, got {args.decode_batches}")
  if args.eos_check_every and min(args.eos_check_every) < 1:
    p.error(f"--eos-check-every: expected steps >= 1, got {args.eos_check_every}")
  if args.hidden % args.heads or args.heads % args.kv_heads:
    p.error(f"--hidden {args.hidden} / --heads {args.heads} / --kv-heads {args.kv_heads}: "
            "hidden must split into heads, and heads into kv-heads groups")
  # What sampler.py's helpers read from their own flags.
  args.jax_dtype = args.torch_dtype = args.dtype
  args.cache_dtype, args.gguf = None, ""
  return args


def nominal_peak_tflops(device_kind: str) -> float | None:
  """The data-sheet dense bfloat16 peak of a device kind, or None when unknown (CPUs)."""
  for part, tflops in NOMINAL_PEAK_TFLOPS:
    if part.lower() in device_kind.lower():
      return tflops
  return None


def matmul_weights(config) -> int:
  """Weights that enter a matmul per token: the blocks' projections and the unembedding."""
  c = config
  attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.hidden_size * c.intermediate_size
  return c.num_layers * (attn + mlp) + c.vocab_size * c.hidden_size


def train_flops_per_token(config, length: int) -> float:
  """Model flops of one trained token (module docstring): 6 per matmul weight plus attention."""
  c = config
  attention = 12 * c.num_layers * c.num_heads * c.head_dim * (length + 1) / 2
  return 6.0 * matmul_weights(config) + attention


def decode_read_bytes(config, batch: int, mean_filled: float) -> float:
  """Bytes a decoding step must read: every weight once, and the filled KV-cache slots."""
  c = config
  itemsize = jnp.dtype(c.dtype).itemsize
  weights = matmul_weights(config) * jnp.dtype(c.param_dtype).itemsize
  # RMSNorm scales and the B embedding rows a step reads are negligible.
  kv = c.num_layers * 2 * c.num_kv_heads * c.head_dim * itemsize * batch * mean_filled
  return weights + kv


def bench_train(args, torch_model, jax_model, peaks, rng):
  tokens, attn, resp = train_step.train_batch(args, jax_model.config.vocab_size, rng)
  (jax_first, jax_wall, _), xla_flops = train_step.jax_train_timing(
      jax_model, tokens, attn, resp, False, args.repeats)
  torch_first, torch_wall, _ = train_step.torch_train_timing(torch_model, tokens, resp,
                                                             args.repeats)
  _free_torch_cache(args.torch_device)
  n = tokens.size
  model_flops = train_flops_per_token(jax_model.config, args.train_len) * n
  out = dict(tokens_per_step=n, model_tflop_per_step=model_flops / 1e12,
             xla_tflop_per_step=xla_flops / 1e12)
  for side, first, wall in (("jax", jax_first, jax_wall), ("torch", torch_first, torch_wall)):
    tflops = model_flops / wall / 1e12
    out[side] = dict(first_call_s=first, step_s=wall, tokens_per_s=n / wall, model_tflops=tflops,
                     mfu_nominal=tflops / peaks["nominal_tflops"] if peaks["nominal_tflops"]
                     else None, of_measured_gemm_peak=tflops / peaks["gemm_tflops"])
  out["jax_over_torch"] = torch_wall / jax_wall
  return out


def bench_decode(args, torch_model, jax_model, peaks, rng):
  rows = {}
  for batch in args.decode_batches:
    a = argparse.Namespace(**{**vars(args), "batch": batch, "trace_dir": os.path.join(
        args.trace_dir, f"decode_batch{batch}") if args.trace_dir else ""})
    tokens, mask = bench.make_prompts(a, rng, jax_model.config.vocab_size)
    rates = bench.bench_sampling(a, torch_model, jax_model, tokens, mask)
    _free_torch_cache(args.torch_device)
    row = dict(tokens_per_s=dict(jax=rates["jax_wall"], torch=rates["torch_wall"]),
               first_call_s=dict(jax=rates["jax_first"], torch=rates["torch_first"]))
    if "jax_decode_ms" in rates:
      # Step t (1 .. N-1) reads the prompt's slots and t generated ones.
      mean_filled = float(mask.sum(1).mean()) + args.new_tokens / 2
      bound_ms = 1e3 * decode_read_bytes(jax_model.config, batch, mean_filled) / (
          peaks["read_gb_s"] * 1e9)
      step_ms = dict(jax=rates["jax_decode_ms"], torch=rates["torch_decode_ms"])
      row.update(step_ms=step_ms, bound_ms=bound_ms,
                 of_bound={side: bound_ms / ms if ms else None for side, ms in step_ms.items()})
      # JSON keys are strings: "every k steps" -> ms.
      row["jax_step_ms_eos_checked"] = {
          str(k): bench.jax_decode_ms_with_eos_checks(a, jax_model, tokens, mask, k)
          for k in args.eos_check_every}
    rows[batch] = row
  return rows


def bench_attention(args, config, rng):
  """Forward + backward of one causal self-attention per kernel, and its distance to dense."""
  b, l, g = args.train_batch, args.train_len, config.num_heads // config.num_kv_heads
  shape_kv = (b, l, config.num_kv_heads, config.head_dim)
  q, k, v, w = (jnp.asarray(rng.standard_normal(s), config.dtype)
                for s in (shape_kv[:3] + (g, config.head_dim), shape_kv, shape_kv,
                          shape_kv[:3] + (g, config.head_dim)))
  mask = attention_lib.AttentionMask(jnp.arange(l, dtype=jnp.int32), jnp.ones((b, l), bool))
  scale = config.head_dim ** -0.5
  rows, dense_out = {}, None
  for impl in IMPLS:
    def loss(q, k, v, impl=impl):
      out = attention_lib.attend(impl, q, k, v, mask, sliding_window=None, scale=scale,
                                 chunk_size=config.attention_chunk_size)
      return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

    t0 = time.perf_counter()
    # One compilation serves the HLO check and the timed calls.
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)).lower(
        q, k, v).compile()
    compile_s = time.perf_counter() - t0
    hlo = fn.as_text()
    (_, out), _ = fn(q, k, v)
    _, wall, _ = timing.timed(lambda: jax.block_until_ready(fn(q, k, v)), args.repeats)
    out = np.asarray(out, np.float32)
    dense_out = out if impl == "dense" else dense_out
    rows[impl] = dict(fwd_bwd_ms=1e3 * wall, compile_s=compile_s,
                      max_abs_diff_vs_dense=float(np.abs(out - dense_out).max()),
                      cudnn_fused="__cudnn$fmha" in hlo)
  return rows


def _free_torch_cache(device):
  """Hands torch's cached device blocks back so that the next JAX measurement has them."""
  if str(device).startswith("cuda"):
    torch.cuda.empty_cache()


def measure_peaks(args):
  on_accelerator = jax.default_backend() != "cpu"
  kind = jax.devices()[0].device_kind
  # The table holds bfloat16 peaks; a float32 run has none unless --peak-tflops gives it.
  nominal = args.peak_tflops or (nominal_peak_tflops(kind) if args.dtype == "bfloat16" else None)
  sizes = (4096, 8192) if on_accelerator else (1024, 2048)
  # An 8192^3 bfloat16 product takes about 1.5 ms on an H100-class GPU: the
  # median of 3 such calls moved from 531 to 712 TFLOP/s between two runs on
  # one H200, so accelerators take the median of at least 20.
  repeats = max(args.repeats, 20) if on_accelerator else args.repeats
  gemm = peaks_lib.gemm_peak(repeats, args.dtype, sizes) / 1e3
  read, how = peaks_lib.read_bandwidth(args.repeats, 2.0 if on_accelerator else 0.25,
                                       args.torch_device)
  return dict(device_kind=kind, nominal_tflops=nominal, gemm_tflops=gemm, read_gb_s=read,
              read_by=how)


def decode_line(batch, row):
  """One row of the sampling table; a decoding step of None reads 'noise' (`decode_step_ms`)."""
  tok = row["tokens_per_s"]
  pair = f"{tok['jax']:.0f} / {tok['torch']:.0f}"
  line = f"{batch:>6}{pair:>22}{tok['jax'] / tok['torch']:>6.2f}x"
  if "step_ms" in row:
    ms, of = row["step_ms"], row["of_bound"]
    steps = " / ".join(f"{ms[s]:.2f}" if ms[s] else "noise" for s in ("jax", "torch"))
    shares = " / ".join(f"{100 * of[s]:.0f}%" if of[s] else "n/a" for s in ("jax", "torch"))
    line += f"{steps:>22}{row['bound_ms']:>10.3f}{shares:>23}"
  return line


def report_peaks(args, p):
  """Prints the device, its data-sheet peak and the peaks this run measured."""
  nominal = "unknown" if p["nominal_tflops"] is None else f"{p['nominal_tflops']:.1f} TFLOP/s"
  print(f"device {p['device_kind']}: nominal dense {args.dtype} peak {nominal}, measured GEMM peak "
        f"{p['gemm_tflops']:.1f} TFLOP/s, read bandwidth {p['read_gb_s']:.0f} GB/s "
        f"({p['read_by']})")


def report_train(args, t):
  """Prints the train step's table: tokens/s, TFLOP/s, MFU and first call of each side."""
  print(f"\ntrain step {args.train_batch}x{args.train_len} tokens, Adam, {args.dtype}, "
        f"attention {args.attention_impl}, remat {args.remat}: "
        f"{t['model_tflop_per_step']:.2f} model TFLOP per step "
        f"(XLA counts {t['xla_tflop_per_step']:.2f})")
  print(f"{'side':<7}{'tok/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'of GEMM peak':>14}{'1st call s':>12}")
  for side in ("jax", "torch"):
    r = t[side]
    mfu = "n/a" if r["mfu_nominal"] is None else f"{100 * r['mfu_nominal']:.1f}%"
    print(f"{side:<7}{r['tokens_per_s']:>10.0f}{r['model_tflops']:>10.1f}{mfu:>8}"
          f"{100 * r['of_measured_gemm_peak']:>13.1f}%{r['first_call_s']:>12.1f}")
  print(f"jax / torch: {t['jax_over_torch']:.2f}x")


def report_decode(args, rows, read_gb_s):
  """Prints the sampling table, a row per batch size (`decode_line`)."""
  print(f"\nsampling, prompts <= {args.prompt_len}, {args.new_tokens} new tokens "
        f"(decoding step: prefill and first token excluded; bound: weights + filled KV cache "
        f"read once at {read_gb_s:.0f} GB/s)")
  print(f"{'batch':>6}{'tok/s jax / torch':>22}{'ratio':>7}{'step ms jax / torch':>22}"
        f"{'bound ms':>10}{'of bound jax / torch':>23}")
  for batch, r in rows.items():
    print(decode_line(batch, r))
  for batch, r in rows.items():
    checked = r.get("jax_step_ms_eos_checked")
    if checked:
      steps = ", ".join(
          f"every {k}: " + ("noise" if ms is None else
                            f"{ms:.2f} ms ({100 * r['bound_ms'] / ms:.0f}% of bound)")
          for k, ms in checked.items())
      print(f"batch {batch}, jax decoding step with an EOS id checked {steps}")


def report_attention(args, rows):
  """Prints each attention kernel's forward + backward time and distance to dense."""
  print(f"\nattention, causal, [{args.train_batch}, {args.train_len}] x {args.heads} heads "
        f"({args.kv_heads} kv) x {args.hidden // args.heads}, {args.dtype}, forward + backward")
  print(f"{'kernel':<24}{'ms':>9}{'max |out - dense|':>19}{'cuDNN fused':>13}")
  for impl, r in rows.items():
    print(f"{impl:<24}{r['fwd_bwd_ms']:>9.2f}{r['max_abs_diff_vs_dense']:>19.2e}"
          f"{str(r['cudnn_fused']):>13}")


def run_phases(args, results, phases):
  """Runs each (name, measure, report) in turn, printing and saving its numbers when it ends.

  A lease lasts minutes: a phase that fails (say torch out of memory) is
  recorded as an error in the results and the next one still runs, and
  everything measured so far is already on disk should the lease end first.
  A phase whose numbers were measured but could not be printed keeps them,
  with the error beside them.

  Returns:
    The names of the phases that failed.
  """
  failed = []
  for name, measure, show in phases:
    t0 = time.perf_counter()
    try:
      results[name] = measure()
      show(results[name])
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      results[name] = {**results.get(name, {}), "error": f"{type(e).__name__}: {e}"}
      failed.append(name)
    print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
  return failed


def main(argv=None):
  args = parse_args(argv)
  # Float32 matmuls at full precision on both sides (JAX would use TF32 on GPUs, torch
  # not); bfloat16 products are unaffected.
  jax.config.update("jax_default_matmul_precision", "float32")
  torch.set_float32_matmul_precision("highest")
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind}), "
        f"torch {torch.__version__} on {args.torch_device}, transformers "
        f"{transformers.__version__}; float32 matmul precision: jax "
        f"{jax.config.jax_default_matmul_precision!r}, torch "
        f"{torch.get_float32_matmul_precision()!r}")
  rng = np.random.default_rng(args.seed)
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    torch_model, jax_model = weights.build_models(args, workdir, attention_impl=args.attention_impl,
                                                remat=args.remat)
  c = jax_model.config
  print(f"model: {c.num_layers} layers, d={c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads}, "
        f"ffn {c.intermediate_size}, vocab {c.vocab_size}, tied {c.tie_word_embeddings}, "
        f"{matmul_weights(c) / 1e9:.3f}B matmul weights, {c.dtype}; built in "
        f"{time.perf_counter() - t0:.0f} s")
  tokens, mask = bench.make_prompts(
      argparse.Namespace(**{**vars(args), "batch": 4}), rng, c.vocab_size)
  results = dict(args=dict(vars(args)))
  results["parity_max_abs_logit_diff"] = bench.check_parity(torch_model, jax_model, tokens, mask)
  print(f"parity: max |logits_jax - logits_torch| = {results['parity_max_abs_logit_diff']:.2e}")
  # Each phase reads the peaks the first one stored.
  phases = (
      ("peaks", lambda: measure_peaks(args), lambda p: report_peaks(args, p)),
      ("train", lambda: bench_train(args, torch_model, jax_model, results["peaks"], rng),
       lambda t: report_train(args, t)),
      ("decode", lambda: bench_decode(args, torch_model, jax_model, results["peaks"], rng),
       lambda rows: report_decode(args, rows, results["peaks"]["read_gb_s"])),
      ("attention", lambda: bench_attention(args, c, rng), lambda rows: report_attention(args, rows)),
  )
  failed = run_phases(args, results, [phase for phase in phases if phase[0] in args.phases])
  if failed:
    raise SystemExit(f"failed: {', '.join(failed)} (the error of each is in the output above"
                     f"{' and in ' + args.out if args.out else ''})")
  return results


if __name__ == "__main__":
  main()
