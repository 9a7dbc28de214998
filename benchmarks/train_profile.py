"""Where the time of a CPU train step goes, piece by piece, and the GEMM peak.

Times jitted forward+backward passes of the pieces of one train step of the
`benchmarks.sampler` model (Llama, 4 layers, d=256, 4 heads, ffn 1024,
vocab 32k, batch 8 × 128 tokens, float32) separately:
  * the unembedding + next-token log-probs, in the variants the decoder has
    had: a rematerialised one-chunk scan with log_softmax + gather (the
    implementation before the single-chunk shortcut), log_softmax + gather
    without remat, and logit - logsumexp without remat (the current one);
    and full [B, L, V] logits + log_softmax as the `full_logits` variant;
  * the attention kernels (dense and chunked) of all layers;
  * the SwiGLU MLPs of all layers;
  * all blocks (hidden states);
  * one Adam update of all parameters;
  * the whole train step (forward + backward + Adam, donated buffers) with
    `Decoder.token_logprobs`, with the same step through the pre-shortcut
    log-prob path (token_logprobs_before), and with full logits,
and a float32 GEMM peak: the best GFLOP/s of a few jitted matmuls, among
them the unembedding's own shape. The train step's achieved GFLOP/s uses
XLA's own flop count of the compiled step (`cost_analysis`) next to the
6 · (matmul parameters) · tokens estimate.

Each piece reports the median over `--repeats` calls of wall and process CPU
time (all threads); on a shared machine the CPU time is the steadier one.

Run:
  python -m benchmarks.train_profile --threads 2
  python -m benchmarks.train_profile --threads 2 --repeats 5 --layers 2   # quicker
  python -m benchmarks.train_profile --threads 2 --dtype bfloat16         # bf16 params+compute
"""

from __future__ import annotations

import argparse
import os

from benchmarks import sampler as sampler_bench
from benchmarks.timing import set_xla_threads, timed


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sampler_bench.add_model_args(p)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--threads", type=int, default=2, help="XLA CPU threads (0 = default)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="param and compute dtype (logits and log-probs stay float32)")
  p.add_argument("--skip", default="", help="comma-separated piece names to skip")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  set_xla_threads(args.threads)
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from onpo_jax.models import attention as attention_lib
  from onpo_jax.models import config as config_lib
  from onpo_jax.models import decoder as decoder_lib

  skip = set(filter(None, args.skip.split(",")))
  b, l = args.batch, args.length
  cfg = config_lib.DecoderConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
      head_dim=args.hidden // args.heads, max_position_embeddings=4096,
      param_dtype=args.dtype, dtype=args.dtype)
  model = decoder_lib.Decoder(cfg, rngs=nnx.Rngs(params=jax.random.key(0, impl="unsafe_rbg")))
  graphdef, params = nnx.split(model)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  tokens = jax.random.randint(next(keys), (b, l), 3, cfg.vocab_size, jnp.int32)
  attn = jnp.ones((b, l), bool)
  resp = jnp.zeros((b, l), bool).at[:, l // 2:].set(True)
  pos = decoder_lib.positions_from_mask(attn)
  dt = jnp.dtype(args.dtype)
  h = jax.random.normal(next(keys), (b, l, cfg.hidden_size), jnp.float32).astype(dt)
  w = (0.02 * jax.random.normal(next(keys), (cfg.hidden_size, cfg.vocab_size))).astype(dt)
  n_tok = b * l
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), cpus={os.cpu_count()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"model: llama {cfg.num_layers} layers, d={cfg.hidden_size}, heads={cfg.num_heads}/"
        f"{cfg.num_kv_heads}, ffn={cfg.intermediate_size}, vocab={cfg.vocab_size}, {args.dtype}; "
        f"batch {b} x {l} tokens")

  rows = []

  def run(name, fn, *fargs, flops=None):
    if name.split(" ")[0] in skip:
      return None
    compiled = jax.jit(fn).lower(*fargs).compile()
    first, wall, cpu = timed(lambda: jax.block_until_ready(compiled(*fargs)), args.repeats)
    if flops is None:
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops = float(cost.get("flops", 0.0)) if cost else 0.0
    rows.append((name, wall, cpu, flops))
    print(f"  {name:<52}{wall * 1e3:9.1f} ms wall{cpu * 1e3:9.1f} ms cpu"
          f"{flops / wall / 1e9:9.1f} GFLOP/s", flush=True)
    return wall

  # -------------------------------------------------------------- GEMM peak
  print("float32 GEMM (jitted jnp.dot, GFLOP/s = 2·m·k·n / wall):")
  peak = 0.0
  for m, k, n in ((b * l, cfg.hidden_size, cfg.vocab_size), (1024, 1024, 1024),
                  (2048, 2048, 2048), (b * l, cfg.hidden_size, cfg.intermediate_size)):
    x = jax.random.normal(next(keys), (m, k), jnp.float32)
    y = jax.random.normal(next(keys), (k, n), jnp.float32)
    wall = run(f"gemm {m}x{k}x{n}", jnp.dot, x, y, flops=2.0 * m * k * n)
    if wall is not None:
      peak = max(peak, 2.0 * m * k * n / wall / 1e9)
  print(f"GEMM peak: {peak:.1f} GFLOP/s")

  # ----------------------------------------------------- unembed + log-probs
  print("pieces (forward + backward unless noted):")

  def remat_scan_logprobs(h, w, toks):
    """The pre-shortcut path: [B, L-1] log-probs in one chunk, still scanned and rematerialised."""
    @jax.checkpoint
    def one_chunk(hc, tc):
      logits = jnp.einsum("...d,dv->...v", hc, w, preferred_element_type=jnp.float32)
      logp = jax.nn.log_softmax(logits, axis=-1)
      return jnp.take_along_axis(logp, tc[..., None], axis=-1)[..., 0]
    return jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None,
                        (h[None, :, :-1], toks[None, :, 1:]))[1][0]

  def logprob_remat_scan(h, w):
    return jnp.sum(jnp.where(resp[:, 1:], remat_scan_logprobs(h, w, tokens), 0.0))

  def logprob_log_softmax(h, w):
    logits = jnp.einsum("...d,dv->...v", h[:, :-1], w, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    out = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(resp[:, 1:], out, 0.0))

  def logprob_current(h, w):
    out = decoder_lib.chunked_token_logprobs(
        h, tokens, attn,
        lambda x: jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32))
    return jnp.sum(jnp.where(resp, out, 0.0))

  def unembed_only(h, w):
    return jnp.sum(jnp.einsum("...d,dv->...v", h[:, :-1], w, preferred_element_type=jnp.float32))

  grad_hw = lambda f: jax.grad(f, argnums=(0, 1))  # noqa: E731
  run("logprob_remat_scan (before): unembed+log_softmax", grad_hw(logprob_remat_scan), h, w)
  run("logprob_log_softmax: unembed+log_softmax, no remat", grad_hw(logprob_log_softmax), h, w)
  run("logprob_current: unembed+(z_t - logsumexp z)", grad_hw(logprob_current), h, w)
  run("unembed matmul alone", grad_hw(unembed_only), h, w)

  # ---------------------------------------------------------- block pieces
  blocks = list(model.layers)
  d = cfg.head_dim
  g = cfg.num_heads // cfg.num_kv_heads
  q = jax.random.normal(next(keys), (b, l, cfg.num_kv_heads, g, d)).astype(dt)
  kv = jax.random.normal(next(keys), (2, b, l, cfg.num_kv_heads, d)).astype(dt)
  amask = attention_lib.AttentionMask(jnp.arange(l, dtype=jnp.int32), attn)
  for impl in ("dense", "chunked"):
    def attn_loss(q, kv, impl=impl):
      total = 0.0
      for _ in range(cfg.num_layers):  # one kernel per layer, as in the step
        out = attention_lib.attend(impl, q, kv[0], kv[1], amask, sliding_window=None,
                                   scale=d ** -0.5, chunk_size=cfg.attention_chunk_size)
        total = total + jnp.sum(out)
        q = q + out
      return total
    run(f"attention_{impl}: score kernels, all layers", jax.grad(attn_loss, (0, 1)), q, kv)

  mlp_graph, mlp_params = nnx.split(nnx.List([blk.mlp for blk in blocks]))

  def mlp_loss(p, x):
    total = 0.0
    for mlp in nnx.merge(mlp_graph, p):
      x = x + mlp(x)
      total = total + jnp.sum(x)
    return total
  run("mlp: SwiGLU, all layers", jax.grad(mlp_loss, (0, 1)), mlp_params, h)

  def hidden_loss(p):
    hs, _ = nnx.merge(graphdef, p).hidden_states(tokens, pos, attn)
    return jnp.sum(hs)
  run("hidden_states: embed + all blocks + final norm", jax.grad(hidden_loss), params)

  # -------------------------------------------------------------- optimizer
  tx = optax.adam(1e-5)
  opt_state = tx.init(params)

  def adam(p, s, grads):
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s
  run("adam: one update of all parameters (forward only)", adam, params, opt_state, params)

  # ------------------------------------------------------------ whole step
  def make_step(variant):
    def loss_fn(p):
      m = nnx.merge(graphdef, p)
      if variant == "full_logits":
        logits, _ = m(tokens, pos, attn)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), tokens[:, 1:, None],
                                 axis=-1)[..., 0]
        lp = jnp.pad(lp, ((0, 0), (1, 0)))
      elif variant == "token_logprobs_before":
        hs, _ = m.hidden_states(tokens, pos, attn)
        lp = remat_scan_logprobs(hs, m.lm_head[...].astype(hs.dtype), tokens)
        lp = jnp.pad(lp, ((0, 0), (1, 0)))
      else:
        lp = m.token_logprobs(tokens, pos, attn)
      return -jnp.mean(jnp.sum(jnp.where(resp, lp, 0.0), axis=-1))

    def step(p, s):
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss
    return step

  n_matmul = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if "embed" not in jax.tree_util.keystr(path) and x.ndim >= 2)
  estimate = 6.0 * n_matmul * n_tok
  print(f"train step ({n_matmul / 1e6:.2f}M matmul parameters: 6·N·tokens = "
        f"{estimate / 1e9:.1f} GFLOP per step; XLA's count below):")
  for variant in ("token_logprobs_before", "token_logprobs", "full_logits"):
    step = make_step(variant)
    name = f"train_step ({variant}), adam"
    if name.split(" ")[0] in skip:
      continue
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    carry = [jax.tree.map(jnp.copy, params), tx.init(params)]

    def call():
      carry[0], carry[1], loss = compiled(carry[0], carry[1])
      jax.block_until_ready(loss)
    _, wall, cpu = timed(call, args.repeats)
    rows.append((name, wall, cpu, flops))
    print(f"  {name:<52}{wall * 1e3:9.1f} ms wall{cpu * 1e3:9.1f} ms cpu"
          f"{flops / wall / 1e9:9.1f} GFLOP/s  {n_tok / wall:7.0f} tok/s wall"
          f"{n_tok / cpu:7.0f} tok/s cpu",
          flush=True)
    share = f"{100 * flops / wall / 1e9 / peak:.0f}% of the GEMM peak" if peak else "no peak"
    print(f"    = {share} ({flops / 1e9:.1f} GFLOP by XLA's count)")


if __name__ == "__main__":
  main()
