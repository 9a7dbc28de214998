"""Static sampling settings (`SamplingConfig`), re-exported by `onpo_jax.sampler`.

Every field is static: the sampler's jitted functions are compiled per config.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onpo_jax.infra import checks

CACHE_DTYPES = ("float32", "bfloat16", "float16")
DECODE_LAYOUTS = ("auto", "tokens", "features")
# A check per 8 steps on GPUs: XLA:GPU copies each check's result to the host
# and waits for the device before it launches the next step's kernels, and an
# early stop then runs at most 7 steps past the last EOS.
GPU_EOS_CHECK_EVERY = 8


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings; changing any of them recompiles the sampler.

  Attributes:
    max_new_tokens: N, number of response tokens generated per prompt (> 0).
    temperature: divides the logits before sampling (> 0); ignored when greedy.
    top_k: keep only the k most likely tokens (0 = off). Ties with the k-th
      logit are kept, as in transformers' `TopKLogitsWarper`.
    top_p: nucleus sampling, keep the smallest top set of mass ≥ top_p
      (1.0 = off), applied after temperature and top-k as in transformers.
    greedy: take the argmax of the model's logits (temperature/top-k/top-p
      cannot change the argmax, so they are ignored).
    eos_ids: a sequence stops after generating any of these ids (Llama 3 lists
      several); empty = never stop (fixed-length responses).
    pad_id: written on every response position after the first EOS.
    prompt_buckets: strictly increasing prompt lengths; a prompt batch is
      left-padded to the smallest bucket that fits it.
    cache_dtype: KV-cache dtype ('float32' | 'bfloat16' | 'float16'); None
      uses the model's compute dtype.
    eos_check_every: decoding steps run between two checks whether every row
      has ended (only with `eos_ids`). None: 1 on CPU and TPU, which evaluate
      the check where the loop runs, and `GPU_EOS_CHECK_EVERY` on GPUs, where
      XLA copies each check's result to the host and waits for the device,
      so the next step's kernels are launched only after the previous step
      finished. Samples do not depend on it: steps after every row ended are
      masked like any token after an EOS; at most `eos_check_every - 1` such
      steps run.
    cache_segments: G, the number of KV-cache lengths the decoding loop goes
      through. A decoding step reads every slot of the cache it carries,
      filled or not; with G segments the cache starts at the prompt's length
      plus about N/G slots and grows (one copy) each time the steps reach its
      end, so a long response's steps read about (G + 1) / 2G of the slots
      that one cache of prompt + N slots would have them read. Samples do not
      depend on it. The price: each segment compiles the decoding step once
      more, and caches of several lengths are alive at once (the first
      segment's, passed in, and the two around the last growth): up to about
      twice the KV-cache memory of one segment (`peak_cache_slots`).
    decode_layout: how a decoding step lays out its activations. 'tokens':
      [B, 1, D], the model's own forward. 'features': [D, B], with the
      kernels copied transposed to [out, in] once per call
      (`models.feature_major`), which XLA:CPU's GEMM libraries run faster
      with few rows (9-17% of a SmolLM2-135M step at batch 16 and 64 on a
      2-core CPU, benchmarks/README.md); the copy holds every kernel once
      more, in the compute dtype, while the call runs. 'auto' (default):
      'features' on CPU, 'tokens' on GPUs and TPUs. Samples do not depend on
      it beyond float rounding.
    share_prefill: prefill each distinct prompt of a batch once (default
      True). Self-play samples K responses per prompt, so its batches hold
      every prompt K times; the prefill then runs on the distinct prompts
      only (their count rounded up to a power of two and to a multiple of
      the batch's shards, so few shapes compile) and each row's cache is
      gathered from its prompt's. Nothing changes when that count is not
      below the batch. Samples do not depend on it beyond float rounding.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  prompt_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
  cache_dtype: str | None = None
  eos_check_every: int | None = None
  cache_segments: int = 1
  decode_layout: str = "auto"
  share_prefill: bool = True

  def __post_init__(self):
    # Lists (e.g. generation_config.json's eos_token_id) are accepted and frozen.
    for name in ("eos_ids", "prompt_buckets"):
      value = getattr(self, name)
      if isinstance(value, (list, np.ndarray)):
        object.__setattr__(self, name, tuple(int(v) for v in value))
    _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
    if not checks.is_real(self.temperature) or self.temperature <= 0:
      raise ValueError(
          f"SamplingConfig.temperature must be a finite float > 0, got {self.temperature!r}")
    _check_int("top_k", self.top_k, minimum=0)
    if not checks.is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")
    if not isinstance(self.greedy, bool):
      raise ValueError(f"SamplingConfig.greedy must be a bool, got {self.greedy!r}")
    if not isinstance(self.eos_ids, tuple):
      raise ValueError(f"SamplingConfig.eos_ids must be a tuple of ints, got {self.eos_ids!r}")
    for e in self.eos_ids:
      _check_int("eos_ids[...]", e, minimum=0)
    _check_int("pad_id", self.pad_id, minimum=0)
    if not isinstance(self.prompt_buckets, tuple) or not self.prompt_buckets:
      raise ValueError(
          "SamplingConfig.prompt_buckets must be a non-empty tuple of ints, "
          f"got {self.prompt_buckets!r}")
    for b in self.prompt_buckets:
      _check_int("prompt_buckets[...]", b, minimum=1)
    if any(b >= c for b, c in zip(self.prompt_buckets, self.prompt_buckets[1:])):
      raise ValueError(
          f"SamplingConfig.prompt_buckets must be strictly increasing, got {self.prompt_buckets}")
    if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
      raise ValueError(
          f"SamplingConfig.cache_dtype must be None or one of {CACHE_DTYPES}, "
          f"got {self.cache_dtype!r}")
    if self.eos_check_every is not None:
      _check_int("eos_check_every", self.eos_check_every, minimum=1)
    _check_int("cache_segments", self.cache_segments, minimum=1)
    if not isinstance(self.share_prefill, bool):
      raise ValueError(
          f"SamplingConfig.share_prefill must be a bool, got {self.share_prefill!r}")
    if self.decode_layout not in DECODE_LAYOUTS:
      raise ValueError(
          f"SamplingConfig.decode_layout must be one of {DECODE_LAYOUTS}, "
          f"got {self.decode_layout!r}")

  def steps_per_eos_check(self, backend: str) -> int:
    """`eos_check_every`, or its default on `backend` (a `jax.default_backend()` name)."""
    if self.eos_check_every is not None:
      return self.eos_check_every
    return GPU_EOS_CHECK_EVERY if backend in ("gpu", "cuda", "rocm") else 1

  def feature_major(self, backend: str) -> bool:
    """Whether decoding steps on `backend` lay out activations [D, B] (`decode_layout`)."""
    if self.decode_layout == "auto":
      return backend == "cpu"
    return self.decode_layout == "features"

  def cache_segment_ends(self, backend: str) -> tuple[int, ...]:
    """The decoding steps at which each cache segment ends, the last being N.

    Segment j runs steps [ends[j - 1], ends[j]) (the first from step 1: step
    0 samples from the prefill's logits) with a cache of prompt + ends[j]
    slots: step t writes slot prompt + t - 1. With EOS ids every inner
    boundary is 1 plus a multiple of the steps between two checks, so the
    loop's blocks of steps never cross one. Fewer segments than asked come
    out when N is too short to split that many times.

    Args:
      backend: a `jax.default_backend()` name (for the default check period).
    """
    n, segments = self.max_new_tokens, self.cache_segments
    every = self.steps_per_eos_check(backend) if self.eos_ids else 1
    ends = []
    for j in range(1, segments):
      end = 1 + round((n - 1) * j / segments / every) * every
      if 1 < end < n and (not ends or end > ends[-1]):
        ends.append(end)
    return tuple(ends) + (n,)

  def peak_cache_slots(self, prompt_length: int, backend: str) -> int:
    """KV-cache slots (per model) alive at once while a prompt bucket decodes.

    One segment: prompt + N. Several: the first segment's cache (the decoding
    call's argument, alive until it returns), and the caches before and after
    the last growth.
    """
    ends = self.cache_segment_ends(backend)
    slots = [prompt_length + e for e in (ends[0],) + ends[-2:]]
    return slots[-1] if len(ends) == 1 else sum(slots[int(len(ends) == 2):])


def _check_int(name, value, *, minimum):
  if not checks.is_int(value, minimum):
    raise ValueError(f"SamplingConfig.{name} must be an int >= {minimum}, got {value!r}")
