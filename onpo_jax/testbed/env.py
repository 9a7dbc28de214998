"""The exact-evaluation testbed: prompts, enumerable responses, the SFT start distribution.

Responses are exactly L tokens over the model's whole vocabulary of V tokens, so
the response set Y = V^L (up to a few thousand) can be enumerated and every
policy quantity computed exactly (`onpo_jax.testbed.evaluation`). The policy's
vocabulary *is* the response vocabulary: there is no token the sampler could
emit outside Y, and the enumerated π(· | x) sums to 1 (tested). Prompts are
short random token sequences over the same vocabulary.

SFT start: μ(y | x) ∝ exp(style(x, y) / temperature) with a
random "style" score, style(x, y) = Σ_t [E[t, y_t] + e(x) · F[t, y_t]], where
e(x) is a random prompt embedding; π_SFT is fitted by maximum likelihood on
samples of μ, so it is neither uniform nor Nash.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from onpo_jax.models import decoder as decoder_lib
from onpo_jax.models.config import DecoderConfig
from onpo_jax.selfplay import examples


def enumerate_responses(vocab_size: int, length: int) -> np.ndarray:
  """All V^L responses in lexicographic order: [V^L, L] int32 (row i has index i)."""
  if vocab_size < 1 or length < 1:
    raise ValueError(f"vocab_size and length must be >= 1; got {vocab_size}, {length}")
  return np.asarray(list(itertools.product(range(vocab_size), repeat=length)), np.int32)


def response_index(tokens: jax.Array, vocab_size: int) -> jax.Array:
  """Index in `enumerate_responses` of each response: [..., L] -> [...] int32."""
  length = tokens.shape[-1]
  weights = vocab_size ** jnp.arange(length - 1, -1, -1, dtype=jnp.int32)
  return jnp.sum(tokens.astype(jnp.int32) * weights, axis=-1)


def make_prompts(key: jax.Array, num_prompts: int, prompt_length: int,
                 vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Distinct random prompts (no padding): tokens [C, P] int32 and mask [C, P] bool.

  Each prompt holds at least two different tokens. A causal decoder with
  rotary positions and no absolute position embedding gives every position of
  a constant sequence the same hidden state (attention averages identical
  values, whatever its weights), so after a prompt like (0, 0, 0) the
  conditionals of the responses 0, 00, 000 ... would be tied and the policy
  could not represent every table; a second token in the prompt breaks the tie.

  Raises:
    ValueError: if P < 2, V < 2 or V^P − V < C (not enough such prompts).
  """
  available = vocab_size ** prompt_length - vocab_size
  if prompt_length < 2 or vocab_size < 2 or available < num_prompts:
    raise ValueError(f"cannot draw num_prompts={num_prompts} distinct prompts of length "
                     f"prompt_length={prompt_length} over vocab_size={vocab_size} tokens with "
                     f"two different tokens each: there are V^P - V = {max(available, 0)} "
                     "(P >= 2 and V >= 2 needed)")
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  ids = np.arange(vocab_size ** prompt_length)
  digits = (ids[:, None] // vocab_size ** np.arange(prompt_length - 1, -1, -1)) % vocab_size
  digits = digits[np.ptp(digits, axis=1) > 0]
  chosen = rng.choice(len(digits), size=num_prompts, replace=False)
  return digits[chosen].astype(np.int32), np.ones((num_prompts, prompt_length), bool)


def start_logprobs(key: jax.Array, num_prompts: int, responses: np.ndarray, vocab_size: int,
                   temperature: float, prompt_dim: int = 4) -> jax.Array:
  """log μ(y | x) [C, |Y|] of the SFT start distribution (module docstring).

  Args:
    key: PRNG key of the style score.
    num_prompts: C.
    responses: [|Y|, L] enumerated responses.
    vocab_size: V.
    temperature: > 0; lower = more peaked.
    prompt_dim: width of the random prompt embedding e(x).

  Returns:
    [C, |Y|] float32 log-probabilities (each row log-sums to 0).
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}")
  length = responses.shape[1]
  k1, k2, k3 = jax.random.split(key, 3)
  e = jax.random.normal(k1, (num_prompts, prompt_dim))
  base = jax.random.normal(k2, (length, vocab_size))
  inter = jax.random.normal(k3, (prompt_dim, length, vocab_size))
  table = base[None] + jnp.einsum("cd,dlv->clv", e, inter)  # [C, L, V]
  pos = jnp.arange(length)
  style = jnp.sum(table[:, pos[None, :], responses], axis=-1)  # [C, |Y|]
  return jax.nn.log_softmax(style / temperature, axis=-1)


def model_config(vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                 num_heads: int, num_kv_heads: int, head_dim: int,
                 max_position_embeddings: int, dtype: str = "float32") -> DecoderConfig:
  """The policy's `DecoderConfig`: vocabulary = response vocabulary, no special tokens.

  No EOS id: responses have a fixed length L, so nothing can end them early.
  `dtype` is both the parameter and the compute dtype.
  """
  return DecoderConfig.tiny(
      vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      max_position_embeddings=max_position_embeddings, eos_token_ids=(), bos_token_id=None,
      pad_token_id=0, param_dtype=dtype, dtype=dtype)


def init_policy(config: DecoderConfig, seed: int):
  """(graphdef, params) of a freshly initialised `Decoder`."""
  return nnx.split(decoder_lib.Decoder(config, rngs=nnx.Rngs(seed)))


def sequence_logprobs(graphdef, params, tokens: jax.Array, attention_mask: jax.Array,
                      response_mask: jax.Array, reduction: str = "sum") -> jax.Array:
  """lp(y | x) [B] of full sequences (prompt + response) by teacher forcing.

  Sum (or mean) of the aligned token log-probs over response positions only;
  positions come from the mask (left padding safe).
  """
  from onpo_jax import logprobs  # Local: keeps the testbed importable on its own.

  model = nnx.merge(graphdef, params)
  positions = decoder_lib.positions_from_mask(attention_mask)
  token_lp = model.token_logprobs(tokens, positions, attention_mask)
  return logprobs.reduce_logprobs(token_lp, response_mask, reduction)


def full_sequences(prompt_tokens: jax.Array, prompt_mask: jax.Array, responses: jax.Array):
  """Prompts [N, P] + complete responses [N, L] -> (tokens, attention, scored) masks.

  Testbed responses have no end-of-sequence token: every position is generated
  and scored (`selfplay.examples.full_sequences` with an all-True mask).
  """
  return examples.full_sequences(prompt_tokens, prompt_mask, responses,
                                 jnp.ones(responses.shape, bool))
