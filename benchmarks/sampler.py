"""Sampler and train-step throughput: onpo_jax (JAX) vs transformers (PyTorch).

Both sides run the same Llama-architecture model with the same weights: a
randomly initialised `transformers.LlamaForCausalLM` is saved to a temporary
directory and imported with `onpo_jax.models.load_hf_checkpoint`. Measured:
  * sampling: tokens/s of `onpo_jax.sampler.Sampler` (jitted prefill + decode
    loop, donated KV cache) vs `model.generate` (KV cache, do_sample, top_k=0),
    exactly `--new-tokens` tokens per prompt on both sides (no EOS stop);
    with `--samples-per-prompt` K the batch repeats each prompt K times, as
    self-play's batches do: the JAX sampler prefills each prompt once
    (`SamplingConfig.share_prefill`; off with `--no-share-prefill`), while
    `generate` prefills every row;
  * training: tokens/s of one jitted forward+backward+Adam step on a
    sequence log-prob loss (sum of response-token log-probs, the second half
    of each row) vs the same step in PyTorch (eager): every position's
    log-prob (`token_logprobs`, `full_logits`), or only the response's
    (`response_logprobs`: `first_target` against transformers'
    `logits_to_keep`).
The first call of each JAX function (compilation) and of each torch function
(warm-up) is timed separately and excluded from the throughput; every JAX
train step's timed calls run in a row, then torch's (`--train-pairs`
alternates them instead; `train_alone.py` times each side in a process of
its own). The train rows also give the JAX step's GFLOP/s (XLA's flop count
of the compiled step over its wall time) next to a GEMM peak measured by the same run (the best
of a few jitted square matmuls in the JAX side's dtype, with float32 results
as the model's products have them), and each timed call's GFLOP/s against
the peak measured right after that call (the peak of a shared machine moves
from minute to minute); the sampling latency is wall ms
per decoding step (one new token for every row of the batch), the prefill
amortised over the steps, and then without the prefill (the time of the same
call with one new token subtracted) against a lower bound: the larger of
reading every weight once at the read bandwidth and doing the step's matmul
flops at the GEMM peak, both measured by the same run.
With `--gguf` both sides run real weights instead: the GGUF file (default:
SmolLM2-135M-Instruct, installed by `make install`) is dequantised by
`onpo_jax.models.load_gguf_checkpoint`, exported with `save_hf_checkpoint`
and loaded by transformers from that directory.
With `--filter-logits` only `onpo_jax.sampler.filter_logits` is timed (`filter_logits.py`; jitted,
float32 logits [16, 49152] and [64, 49152], top-p 0.9 with and without top-k
50): its bisections against the former lax.top_k + full-vocabulary sort.

Run (CPU, defaults: 4 layers, d=256, vocab 32k, batch 32, 64 new tokens):
  python -m benchmarks.sampler
  python -m benchmarks.sampler --layers 2 --batch 8 --new-tokens 16   # quicker
  python -m benchmarks.sampler --gguf smollm2 --batch 16 --train-batch 4   # real weights
  python -m benchmarks.sampler --filter-logits   # top-k / top-p: bisection vs sort
  python -m benchmarks.sampler --gguf smollm2 --batch 16 --samples-per-prompt 4 \
      --prompt-len 128 --skip-train   # the smollm2 job's sampling: 4 prompts x 4 responses
  python -m benchmarks.sampler --gguf smollm2 --batch 64 --skip-train --cpu-devices 2   # JAX's
      # batch over two XLA host devices, one per core (host_devices.py)
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from benchmarks import filter_logits
from benchmarks import host_devices
from benchmarks import train_step
from benchmarks.weights import build_models
from benchmarks.peaks import gemm_peak, read_bandwidth
# Re-exported: train_alone.py calls it from here (and its test records it here).
from benchmarks.peaks import gemm_probe as gemm_probe
from benchmarks.timing import medians, paired_calls, set_xla_threads, sync, timed_calls
from onpo_jax import sampler as sampler_lib
from onpo_jax.infra import host_memory
from onpo_jax.models import decoder as decoder_lib


def add_model_args(p: argparse.ArgumentParser) -> None:
  """The benchmark model's shape flags (4 layers, d 256, vocab 32k by default)."""
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=4)
  p.add_argument("--intermediate", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--tie-embeddings", action="store_true",
                 help="one table for the embedding and the unembedding (Llama-3.2 1B / 3B)")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_model_args(p)
  p.add_argument("--batch", type=int, default=32, help="prompts per sampling call")
  p.add_argument("--prompt-len", type=int, default=32, help="longest prompt (left-padded)")
  p.add_argument("--samples-per-prompt", type=int, default=1,
                 help="K: the batch holds batch/K distinct prompts, each K times in a row, as "
                      "self-play samples them (transformers' num_return_sequences repeats them "
                      "the same way before its prefill)")
  p.add_argument("--no-share-prefill", dest="share_prefill", action="store_false",
                 help="prefill every row, also those repeating a prompt "
                      "(SamplingConfig.share_prefill=False)")
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--train-batch", type=int, default=8)
  p.add_argument("--train-len", type=int, default=128, help="prompt + response length")
  p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=1,
                  help="CPU threads for both torch and XLA (0 = library defaults). Default 1: "
                  "on a shared, oversubscribed machine multi-threaded torch spin-waits and "
                  "runs >10x slower, which would flatter JAX")
  p.add_argument("--skip-train", action="store_true")
  p.add_argument("--train-pairs", action="store_true",
                 help="alternate each JAX train step's timed calls with its torch peer's, back "
                      "to back, and print each pair's ratio (both sides in one process: each "
                      "changes the other's speed, benchmarks/README.md; train_alone.py runs "
                      "each side in a process of its own)")
  p.add_argument("--host-malloc", default="hugepages", choices=host_memory.MODES,
                 help="glibc malloc for the whole process, both sides, as experiments.run's "
                      "--host_malloc ('hugepages' restarts the process; infra/host_memory.py)")
  p.add_argument("--filter-logits", action="store_true",
                 help="only time filter_logits (bisections) against the former top_k + full sort")
  p.add_argument("--jax-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="param and compute dtype of the JAX model")
  p.add_argument("--torch-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="param and compute dtype of the torch model (pass the same as "
                      "--jax-dtype to compare like with like)")
  p.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16"),
                 help="JAX KV-cache dtype (default: the compute dtype)")
  p.add_argument("--gguf", default="",
                 help="real weights from a llama GGUF file ('smollm2': the installed "
                      "SmolLM2-135M-Instruct); the size flags above are then ignored")
  p.add_argument("--matmul-precision", default="highest", choices=("highest", "high"),
                 help="float32 matmul precision, set on both sides: 'highest' = full float32 "
                      "(jax_default_matmul_precision='highest', torch 'highest'); 'high' = "
                      "TF32 on GPUs that have it (JAX's own GPU default, torch 'high'). "
                      "No effect on CPU")
  p.add_argument("--torch-device", default="cpu",
                 help="device of the torch peer ('cuda' on a GPU machine; JAX uses its default "
                      "backend, so run both on the same kind of device)")
  host_devices.add_arg(p)
  args = p.parse_args(argv)
  try:
    host_devices.check(args)
  except ValueError as e:
    p.error(str(e))
  return args


def make_prompts(args, rng, vocab):
  """Left-padded prompts with lengths between prompt_len/2 and prompt_len.

  With `args.samples_per_prompt` K > 1: batch/K of them, each repeated K times in a row.
  """
  k = getattr(args, "samples_per_prompt", 1)
  if k < 1 or args.batch % k:
    raise ValueError(f"--samples-per-prompt: expected a divisor of --batch {args.batch}, got {k}")
  n = args.batch // k
  lengths = rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, size=n)
  tokens = rng.integers(3, vocab, size=(n, args.prompt_len))
  mask = np.arange(args.prompt_len)[None, :] >= (args.prompt_len - lengths)[:, None]
  return np.where(mask, tokens, 0).astype(np.int64).repeat(k, 0), mask.repeat(k, 0)


def _rates(n_tokens, jax_timing, torch_timing, steps=1):
  (jf, jw, jc), (tf, tw, tc) = jax_timing, torch_timing
  return dict(jax_first=jf, torch_first=tf, jax_wall=n_tokens / jw, torch_wall=n_tokens / tw,
              jax_cpu=n_tokens / jc, torch_cpu=n_tokens / tc,
              jax_ms=1e3 * jw / steps, torch_ms=1e3 * tw / steps)


def check_parity(torch_model, jax_model, tokens, mask):
  """Max |Δ logits| at the last prompt slot: the two sides really share weights."""
  device = torch_model.device
  with torch.no_grad():
    ref = torch_model(input_ids=torch.from_numpy(tokens).to(device),
                      attention_mask=torch.from_numpy(mask.astype(np.int64)).to(device)
                      ).logits[:, -1].float().cpu()
  m = jnp.asarray(mask)
  ours, _ = jax_model(jnp.asarray(tokens, jnp.int32), decoder_lib.positions_from_mask(m), m)
  return float(np.abs(np.asarray(ours[:, -1]) - ref.numpy()).max())


def _jax_sampling_time(args, jax_model, tokens, mask, new_tokens, eos_check_every=None,
                       trace_dir=""):
  """(first call s, walls, cpus) of the JAX sampler: fixed-length responses, or with
  `eos_check_every` an EOS id (the vocabulary's last, which rows almost never
  draw) checked every that many steps. With `trace_dir`, one more call runs
  under `jax.profiler.trace` (every kernel with its device time, for
  TensorBoard's profile plugin or Perfetto)."""
  eos = {} if eos_check_every is None else dict(
      eos_ids=(jax_model.config.vocab_size - 1,), eos_check_every=eos_check_every)
  cfg = sampler_lib.SamplingConfig(max_new_tokens=new_tokens, prompt_buckets=(args.prompt_len,),
                                   cache_dtype=args.cache_dtype,
                                   share_prefill=getattr(args, "share_prefill", True), **eos)
  graphdef, state = nnx.split(jax_model)
  smp = sampler_lib.Sampler(graphdef, cfg, model_config=jax_model.config)
  keys = iter(jax.random.split(jax.random.key(args.seed), args.repeats + 2))
  mesh = host_devices.mesh(args)

  def call():
    with host_devices.on_mesh(mesh):
      jax.block_until_ready(smp(state, tokens, mask, next(keys)))

  timing = timed_calls(call, args.repeats)
  if trace_dir:
    with jax.profiler.trace(trace_dir):
      call()
  return timing


def _torch_sampling_time(args, torch_model, tokens, mask, new_tokens):
  gen_cfg = transformers.GenerationConfig(
      do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
      min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=2, use_cache=True)
  t_tokens = torch.from_numpy(tokens).to(torch_model.device)
  t_mask = torch.from_numpy(mask.astype(np.int64)).to(torch_model.device)

  def torch_generate():
    with torch.no_grad():
      out = torch_model.generate(input_ids=t_tokens, attention_mask=t_mask,
                                 generation_config=gen_cfg)
    sync(torch_model.device)
    assert out.shape == (args.batch, args.prompt_len + new_tokens), out.shape

  return timed_calls(torch_generate, args.repeats)


def decode_step_ms(n_token_walls, one_token_walls, new_tokens):
  """Milliseconds per cached decoding step, or None where timer noise hides it.

  One new token costs prefill + sampling the first token, so the N-token time
  minus the one-token time is N - 1 cached decoding steps. Each side's fastest
  call is taken: noise on a shared machine only ever adds time, and the
  fastest call is the one it touched least. Where the difference is not
  positive, the N - 1 steps took less than the noise of the two runs and
  there is no estimate (raise --new-tokens or --repeats).
  """
  steps_s = min(n_token_walls) - min(one_token_walls)
  return 1e3 * steps_s / (new_tokens - 1) if steps_s > 0 else None


def bench_sampling(args, torch_model, jax_model, tokens, mask):
  """Sampling rates of both sides, plus each side's decoding step (`decode_step_ms`)."""
  n_tokens = args.batch * args.new_tokens
  jax_n = _jax_sampling_time(args, jax_model, tokens, mask, args.new_tokens,
                             trace_dir=getattr(args, "trace_dir", ""))
  torch_n = _torch_sampling_time(args, torch_model, tokens, mask, args.new_tokens)
  rates = _rates(n_tokens, medians(jax_n), medians(torch_n), args.new_tokens)
  if args.new_tokens > 1:
    jax_one = _jax_sampling_time(args, jax_model, tokens, mask, 1)[1]
    torch_one = _torch_sampling_time(args, torch_model, tokens, mask, 1)[1]
    rates["jax_decode_ms"] = decode_step_ms(jax_n[1], jax_one, args.new_tokens)
    rates["torch_decode_ms"] = decode_step_ms(torch_n[1], torch_one, args.new_tokens)
  return rates


def jax_decode_ms_with_eos_checks(args, jax_model, tokens, mask, every):
  """The JAX decoding step (`decode_step_ms`) when an EOS is checked every `every` steps."""
  n_walls = _jax_sampling_time(args, jax_model, tokens, mask, args.new_tokens, every)[1]
  one_walls = _jax_sampling_time(args, jax_model, tokens, mask, 1, every)[1]
  return decode_step_ms(n_walls, one_walls, args.new_tokens)


def decode_bound(args, jax_model, sampling, peak_gflops):
  """Prints each side's decoding step against a lower bound on its time.

  A decoding step must read every parameter at least once (the unembedding
  included; the embedding lookup reads B rows, counted as the whole tied
  table or not at all when untied) and do 2 flops per parameter and row in
  its matmuls, so the larger of (parameter bytes / read bandwidth) and
  (2 · B · parameters / GEMM peak) bounds its time from below; attention and
  KV-cache reads come on top and are left out, which keeps the bound
  optimistic. The best jax / torch ratio a decoder could then reach is
  torch's step over the bound.
  """
  if "jax_decode_ms" not in sampling:
    return
  params = nnx.state(jax_model, nnx.Param)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  weights = sum(x.size for x in jax.tree.leaves(params))
  c = jax_model.config
  if not c.tie_word_embeddings:
    weight_bytes -= c.vocab_size * c.hidden_size * jnp.dtype(c.param_dtype).itemsize
    weights -= c.vocab_size * c.hidden_size
  bandwidth, how = read_bandwidth(args.repeats)
  read_ms = 1e3 * weight_bytes / 1e9 / bandwidth
  flop_ms = 1e3 * 2 * args.batch * weights / 1e9 / peak_gflops
  bound_ms = max(read_ms, flop_ms)
  jax_ms, torch_ms = sampling["jax_decode_ms"], sampling["torch_decode_ms"]
  print(f"decoding step (prefill and first token excluded, batch {args.batch}): jax "
        f"{_ms(jax_ms)}, torch {_ms(torch_ms)}. Bound: reading the "
        f"{weight_bytes / 1e6:.0f} MB of weights once at the measured {bandwidth:.1f} GB/s "
        f"({how}) takes {read_ms:.1f} ms, their {2 * args.batch * weights / 1e9:.1f} GFLOP at "
        f"the GEMM peak {peak_gflops:.1f} GFLOP/s {flop_ms:.1f} ms; at the larger, "
        f"{bound_ms:.1f} ms, jax is at {_share(bound_ms, jax_ms)} and torch at "
        f"{_share(bound_ms, torch_ms)}" + (
            f"; a decoder at the bound would be {torch_ms / bound_ms:.2f}x torch"
            if torch_ms else ""))


def _ms(step_ms):
  return f"{step_ms:.1f} ms" if step_ms else "below timer noise"


def _share(bound_ms, step_ms):
  return f"{100 * bound_ms / step_ms:.0f}%" if step_ms else "n/a"


def bench_training(args, torch_model, jax_model, rng):
  """Returns {variant: rates} for three JAX losses against the torch step of the same work.

  'token_logprobs' and 'full_logits' compute every position's log-prob, as
  the torch step does; 'response_logprobs' only the response's (from the
  row's midpoint, where `train_batch` starts it), against torch with
  `logits_to_keep` for the same positions. The JAX steps are timed first,
  then torch's; with `--train-pairs` each JAX step's timed calls alternate
  with its torch peer's instead (`timing.paired_calls`) and
  rates['paired_ratios'] are the pairs' torch wall / jax wall. Each timed
  JAX call is followed by a `gemm_probe`: rates['peak_shares'] are the calls'
  GFLOP/s over the peak measured right after each, rates['probe_peaks'] those
  peaks.
  """
  tokens, attn, resp = train_step.train_batch(args, jax_model.config.vocab_size, rng)
  start = args.train_len // 2
  variants = {"token_logprobs": (False, 1), "full_logits": (True, 1),
              "response_logprobs": (False, start)}
  probe = gemm_probe(args.jax_dtype)
  mesh = host_devices.mesh(args)
  jax_runs, torch_runs = {}, {}
  for name, (full_logits, first) in variants.items():
    call, compile_s, flops = train_step.jax_train_call(jax_model, tokens, attn, resp,
                                                       full_logits, first, mesh)
    probed = []
    after = lambda wall, probed=probed: probed.append((wall, probe()))  # noqa: E731
    if args.train_pairs:
      torch_call, torch_done = train_step.torch_train_call(torch_model, tokens, resp, first)
      jax_calls, torch_runs[name] = paired_calls(call, torch_call, args.repeats, after_a=after)
      torch_done()
    else:
      jax_calls = timed_calls(call, args.repeats, after)
    del call  # frees the parameter and Adam copies before the next variant
    jax_runs[name] = compile_s, flops, jax_calls, probed
  # Without pairs, one torch timing per distinct amount of work, after every JAX step.
  for first in [] if args.train_pairs else sorted({f for _, f in variants.values()}):
    call, done = train_step.torch_train_call(torch_model, tokens, resp, first)
    calls = timed_calls(call, args.repeats)
    done()
    torch_runs.update({name: calls for name, (_, f) in variants.items() if f == first})
  n_tokens = tokens.size
  out = {}
  for name, (compile_s, flops, jax_calls, probed) in jax_runs.items():
    jax_first, jax_wall, jax_cpu = medians(jax_calls)
    rates = _rates(n_tokens, (compile_s + jax_first, jax_wall, jax_cpu), medians(torch_runs[name]))
    rates["gflops"] = flops * rates["jax_wall"] / n_tokens / 1e9
    rates["peak_shares"] = [flops / wall / 1e9 / peak for wall, peak in probed]
    rates["probe_peaks"] = [peak for _, peak in probed]
    if args.train_pairs:
      rates["paired_ratios"] = [t / j for j, t in zip(jax_calls[1], torch_runs[name][1])]
    out[name] = rates
  return out


def setup_process(args):
  """The process-wide settings both sides run under (host malloc, threads, matmul precision).

  Call it first: the malloc setting may restart the process, and XLA reads its
  thread flags when it starts. Prints them.
  """
  host_memory.start(args.host_malloc)
  malloc = host_memory.configure(args.host_malloc)  # before either side starts threads
  if args.threads > 0:
    set_xla_threads(args.threads)
    torch.set_num_threads(args.threads)
  host_devices.request(args.cpu_devices)
  # Left alone, JAX multiplies float32 on GPUs in TF32 and torch in full float32: set
  # both, so a GPU ratio compares the same arithmetic.
  jax.config.update("jax_default_matmul_precision",
                    {"highest": "float32", "high": "tensorfloat32"}[args.matmul_precision])
  torch.set_float32_matmul_precision(args.matmul_precision)
  print(f"float32 matmul precision: {args.matmul_precision} (jax "
        f"{jax.config.jax_default_matmul_precision!r}, torch "
        f"{torch.get_float32_matmul_precision()!r})")
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} devices), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, cpus={os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, host malloc "
        f"{malloc}")


def main(argv=None):
  args = parse_args(argv)
  setup_process(args)
  rng = np.random.default_rng(args.seed)
  if args.filter_logits:
    filter_logits.bench_filter_logits(args)
    return
  with tempfile.TemporaryDirectory() as workdir:
    torch_model, jax_model = build_models(args, workdir)
  host_devices.replicate(jax_model, host_devices.mesh(args))
  c = jax_model.config
  print(f"model: {c.model_type} {c.num_layers} layers, d={c.hidden_size}, "
        f"heads={c.num_heads}/{c.num_kv_heads}, ffn={c.intermediate_size}, vocab={c.vocab_size}, "
        f"jax {c.param_dtype} (cache {args.cache_dtype or c.dtype}), torch {args.torch_dtype}"
        + (f", weights {args.gguf}" if args.gguf else ", random weights"))
  tokens, mask = make_prompts(args, rng, c.vocab_size)
  print(f"parity: max |logits_jax - logits_torch| = "
        f"{check_parity(torch_model, jax_model, tokens, mask):.2e}")
  k = args.samples_per_prompt
  batch = f"batch {args.batch}" + (f" ({args.batch // k}x{k})" if k > 1 else "")
  rows = [("sampling", f"{batch}, prompt<={args.prompt_len}, {args.new_tokens} new tokens"
           + ("" if args.share_prefill else ", no shared prefill")
           + (f", jax on {args.cpu_devices} cpu devices" if args.cpu_devices > 1 else ""),
           bench_sampling(args, torch_model, jax_model, tokens, mask))]
  if not args.skip_train:
    for variant, rates in bench_training(args, torch_model, jax_model, rng).items():
      rows.append(("train step", f"{args.train_batch}x{args.train_len} tok, adam, {variant}",
                   rates))
  header = (f"{'task':<11}{'setting':<38}{'tok/s (wall) jax/torch/ratio':>31}"
            f"{'tok/s (cpu) jax/torch/ratio':>30}{'1st call s jax/torch':>23}")
  print(header)
  print("-" * len(header))
  for name, setting, r in rows:
    wall = f"{r['jax_wall']:.0f} / {r['torch_wall']:.0f} / {r['jax_wall'] / r['torch_wall']:.2f}"
    cpu = f"{r['jax_cpu']:.0f} / {r['torch_cpu']:.0f} / {r['jax_cpu'] / r['torch_cpu']:.2f}"
    first = f"{r['jax_first']:.1f} / {r['torch_first']:.1f}"
    print(f"{name:<11}{setting:<38}{wall:>31}{cpu:>30}{first:>23}")
  print("ratio = jax / torch (> 1: jax faster). 1st call = compilation (jax) / warm-up (torch), "
        f"excluded from tok/s, which come from the median of {args.repeats} calls.")
  sampling = rows[0][2]
  print(f"sampling latency: {sampling['jax_ms']:.1f} / {sampling['torch_ms']:.1f} ms per decoding "
        f"step (jax / torch, wall, batch {args.batch}, prefill amortised)")
  peak = gemm_peak(args.repeats, args.jax_dtype)
  decode_bound(args, jax_model, sampling, peak)
  for name, setting, r in rows[1:]:
    shares = 100 * np.asarray(r["peak_shares"])
    print(f"{name} {setting.split(', ')[-1]}: jax {r['gflops']:.1f} GFLOP/s (XLA's flop count "
          f"of the step / wall) = {100 * r['gflops'] / peak:.0f}% of the {args.jax_dtype} GEMM "
          f"peak {peak:.1f} GFLOP/s; each call against the peak measured right after it: median "
          f"{np.median(shares):.0f}% ({', '.join(f'{s:.0f}' for s in shares)}) of "
          f"{np.median(r['probe_peaks']):.1f} GFLOP/s")
    if "paired_ratios" not in r:
      continue
    pairs = r["paired_ratios"]
    print(f"{name} {setting.split(', ')[-1]}: jax / torch of calls run back to back (torch wall "
          f"/ jax wall per pair, order alternating): median {np.median(pairs):.2f} "
          f"({', '.join(f'{p:.2f}' for p in pairs)})")


if __name__ == "__main__":
  main()
