"""Prompt data: local files / HF datasets dirs / TFDS array_record -> prompt batches."""

from onpo_jax.data.prompts import DEFAULT_PROMPT_COLUMNS
from onpo_jax.data.prompts import host_shard
from onpo_jax.data.prompts import left_pad
from onpo_jax.data.prompts import LengthStats
from onpo_jax.data.prompts import load_hf_dataset_dir
from onpo_jax.data.prompts import PromptBatch
from onpo_jax.data.prompts import PromptRecord
from onpo_jax.data.prompts import PromptSet
from onpo_jax.data.prompts import read_prompt_file
from onpo_jax.data.prompts import read_prompt_files
from onpo_jax.data.prompts import render_prompt
from onpo_jax.data.prompts import round_indices
from onpo_jax.data.prompts import shuffled_order
from onpo_jax.data.prompts import tokenize_prompts
from onpo_jax.data.prompts import truncate_tokens
from onpo_jax.data.sources import load_prompt_records
from onpo_jax.data.sources import PROMPT_SOURCES
from onpo_jax.data.tfds_builder import build_prompt_data_source
from onpo_jax.data.tfds_builder import make_prompt_builder
from onpo_jax.data.tfds_builder import OnpoPromptCollection
from onpo_jax.data.tfds_builder import PromptCollectionConfig
from onpo_jax.data.tfds_builder import records_from_data_source
