"""Decoder models: config, NNX decoder with KV cache, sharding, HF / GGUF import, HF export."""

from onpo_jax.models.config import DecoderConfig
from onpo_jax.models.decoder import Decoder
from onpo_jax.models.decoder import KVCache
from onpo_jax.models.decoder import chunked_token_logprobs
from onpo_jax.models.decoder import init_cache
from onpo_jax.models.decoder import positions_from_mask
from onpo_jax.models.sharding import DEFAULT_RULES
from onpo_jax.models.sharding import activation_sharding
from onpo_jax.models.sharding import cache_shardings
from onpo_jax.models.sharding import create_sharded_model
from onpo_jax.models.sharding import logical_to_spec
from onpo_jax.models.sharding import make_mesh
from onpo_jax.models.sharding import param_bytes_per_device
from onpo_jax.models.sharding import state_shardings
from onpo_jax.models.hf_io import load_hf_checkpoint
from onpo_jax.models.hf_io import save_hf_checkpoint
from onpo_jax.models.gguf import GGUFError
from onpo_jax.models.gguf import load_gguf_checkpoint
from onpo_jax.models.gguf import smollm2_gguf_path
from onpo_jax.models.loading import checkpoint_config
from onpo_jax.models.loading import load_checkpoint
from onpo_jax.models.tokenizer import chat_prompt_ids
from onpo_jax.models.tokenizer import eos_token_ids
from onpo_jax.models.tokenizer import load_tokenizer
