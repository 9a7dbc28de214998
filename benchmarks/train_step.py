"""The JAX train step the benchmarks time and trace.

One forward + backward + Adam step on a sequence log-prob loss: minus the
mean over rows of the summed log-probs of the response tokens (`resp`).
`sampler.py` times it against the same step in PyTorch; `train_trace.py`
traces it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

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
