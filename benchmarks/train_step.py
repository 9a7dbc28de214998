"""The train step the benchmarks time and trace, in JAX and in PyTorch.

One forward + backward + Adam step on a sequence log-prob loss: minus the
mean over rows of the summed log-probs of the response tokens (`resp`).
`jax_train_timing` and `torch_train_timing` time the same step on both sides
(`sampler.py` and `gpu.py` print them side by side); `train_trace.py` traces
the JAX step.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from benchmarks import host_devices
from benchmarks.timing import sync, timed
from onpo_jax.models import decoder as decoder_lib


def make_step(graphdef, tx: optax.GradientTransformation, full_logits: bool,
              first_target: int = 1):
  """step(params, opt_state, tokens, attn, resp) -> (params, opt_state, loss), jitted.

  Args:
    graphdef: the decoder's graph (`nnx.split`).
    tx: the optimizer.
    full_logits: take log_softmax of the full [B, L, V] logits, as the torch
      step does; else `Decoder.token_logprobs` (never stores the logits).
    first_target: with `token_logprobs`, the first position whose log-prob is
      computed (the response's first slot skips the prompt's unembedding; every
      `resp` position must lie at or after it).

  Parameters and optimizer state are donated.
  """
  def loss_fn(params, tokens, attn, resp):
    model = nnx.merge(graphdef, params)
    positions = decoder_lib.positions_from_mask(attn)
    if full_logits:
      logits, _ = model(tokens, positions, attn)
      lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), tokens[:, 1:, None],
                               axis=-1)[..., 0]
      lp = jnp.pad(lp, ((0, 0), (1, 0)))
    else:
      lp = model.token_logprobs(tokens, positions, attn, first_target=first_target)
    return -jnp.mean(jnp.sum(jnp.where(resp, lp, 0.0), axis=-1))

  def step(params, opt_state, tokens, attn, resp):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, attn, resp)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def train_batch(args, vocab, rng):
  """Random tokens [B, L], all attended; the second half of each row plays the response."""
  b, l = args.train_batch, args.train_len
  tokens = rng.integers(3, vocab, size=(b, l))
  attn = np.ones((b, l), bool)
  resp = np.zeros((b, l), bool)
  resp[:, l // 2:] = True  # prompt tokens are masked out of the loss
  return tokens, attn, resp


def jax_train_call(jax_model, tokens, attn, resp, full_logits, first_target=1,
                   mesh=None):
  """(call, compile seconds, XLA's flop count of one step) of the jitted train step.

  call() runs one step on copies of the weights (updated in place, donated)
  and waits for every output. 'token_logprobs' (full_logits False) uses
  `Decoder.token_logprobs` (never stores [B, L, V] logits) from `first_target`
  on; 'full_logits' takes log_softmax of the full logits, as the torch step
  does. With a `mesh` (`host_devices.mesh`; the model's weights placed on
  it), the batch is spread over its 'data' axis and the step compiled in its
  activation sharding; the flop count is then summed over the mesh's devices
  (replicated work, as the optimizer's update of replicated weights, counted
  on each).
  """
  graphdef, params = nnx.split(jax_model)
  tx = optax.adam(1e-5)
  batch = tuple(jax.device_put(x, host_devices.batch_sharding(mesh))
                for x in (np.asarray(tokens, np.int32), attn, resp))
  fresh = jax.tree.map(jnp.copy, params)  # donation must not consume the model's arrays
  carry = [fresh, tx.init(fresh)]
  t0 = time.perf_counter()
  # One compilation serves the flop count and the timed calls.
  with host_devices.on_mesh(mesh):
    step = make_step(graphdef, tx, full_logits, first_target).lower(
        carry[0], carry[1], *batch).compile()
  compile_s = time.perf_counter() - t0
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  if mesh is not None:  # XLA counts one device's share: the step's is their sum
    flops *= mesh.size

  def jax_step():
    carry[0], carry[1], loss = step(carry[0], carry[1], *batch)
    jax.block_until_ready((carry, loss))

  return jax_step, compile_s, flops


def jax_train_timing(jax_model, tokens, attn, resp, full_logits, repeats, first_target=1,
                     after=None, mesh=None):
  """(first, wall, cpu) seconds of `jax_train_call`'s step, and its flop count.

  first = compilation + the first call, as `timed`'s first call of a jitted
  function would be. `after(wall_seconds)` runs after each timed call, outside
  its timing (`timing.timed_calls`) and outside the `mesh`'s context, so that
  a GEMM probe there runs on one device.
  """
  call, compile_s, flops = jax_train_call(jax_model, tokens, attn, resp, full_logits,
                                          first_target, mesh)
  first, wall, cpu = timed(call, repeats, after)
  return (compile_s + first, wall, cpu), flops


def torch_train_call(torch_model, tokens, resp, first_target=1):
  """(call, done) of the same step in PyTorch eager.

  call() runs one step (Adam) and waits for the device; done() drops the
  gradients and puts the model back in eval mode. From `first_target` > 1 on,
  the model returns only the logits of the last L - first_target + 1 positions
  (transformers' `logits_to_keep`), the ones that predict targets
  first_target .. L - 1 (and the unused last one).
  """
  torch_model.train()
  opt = torch.optim.Adam(torch_model.parameters(), lr=1e-5)
  t_tokens = torch.from_numpy(tokens).to(torch_model.device)
  t_resp = torch.from_numpy(resp[:, first_target:]).to(torch_model.device)
  keep = tokens.shape[1] - first_target + 1 if first_target > 1 else 0  # 0: every position

  def torch_step():
    opt.zero_grad(set_to_none=True)
    logits = torch_model(input_ids=t_tokens, logits_to_keep=keep).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, t_tokens[:, first_target:, None])[..., 0]
    loss = -(lp * t_resp).sum(-1).mean()
    loss.backward()
    opt.step()
    sync(torch_model.device)

  def done():
    opt.zero_grad(set_to_none=True)
    torch_model.eval()

  return torch_step, done


def torch_train_timing(torch_model, tokens, resp, repeats, first_target=1):
  """(first, wall, cpu) seconds of `torch_train_call`'s step (its Adam state is dropped)."""
  call, done = torch_train_call(torch_model, tokens, resp, first_target)
  timing = timed(call, repeats)
  done()
  return timing
