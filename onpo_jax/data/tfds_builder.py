"""TFDS builder for local prompt collections, stored as array_record, no TensorFlow.

`tensorflow_datasets` 4.9.10 writes `file_format='array_record'` with its own
in-process writer and reads it back through `builder.as_data_source()` (random
access, numpy/bytes outputs) without importing TensorFlow; the library's own
`import_without_tf_test.py` exercises exactly this path. So the prompt collection
is prepared once, shared by every host from the same `data_dir`, and indexed
directly by the deterministic plan in `prompts.py`.

Each example holds `id`, `roles`, `contents` (the chat messages; a plain prompt
is one user message), `is_chat` and `source` (`<file>:<line>`, for messages).
Examples keep file order (`disable_shuffling=True`): the shuffle is ours, seeded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from typing import Mapping, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from onpo_jax.data import prompts


@dataclasses.dataclass(eq=False)
class PromptCollectionConfig(tfds.core.BuilderConfig):
  """Which local files make up each split, and how to read them.

  Attributes:
    split_files: ((split name, (file, ...)), ...), JSONL / parquet / arrow.
    prompt_columns: candidate prompt columns, first present wins (per file).
    id_column: id column; rows without one get `<file name>:<line>`.
  """
  split_files: tuple[tuple[str, tuple[str, ...]], ...] = ()
  prompt_columns: tuple[str, ...] = prompts.DEFAULT_PROMPT_COLUMNS
  id_column: str | None = "id"


class OnpoPromptCollection(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prompt collection from local files (see module docstring).

  Not registered by name: it only makes sense with a `PromptCollectionConfig`
  pointing at files, so it is built through `make_prompt_builder`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "id, roles, contents, is_chat, source."}

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's default resolves the package through `importlib_resources`,
    # which it does not install; for an installed package this is the same path.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Prompts for on-policy preference optimisation.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "roles": tfds.features.Sequence(tfds.features.Text()),
            "contents": tfds.features.Sequence(tfds.features.Text()),
            "is_chat": np.bool_,
            "source": tfds.features.Text(),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    cfg = self.builder_config
    if not cfg.split_files:
      raise ValueError("PromptCollectionConfig.split_files is empty; expected "
                       "((split, (file, ...)), ...)")
    # Read and validate every file before writing anything, so a bad line fails
    # the build with its location instead of leaving half-written shards.
    splits = {}
    for split, files in cfg.split_files:
      records = prompts.read_prompt_files(list(files), prompt_columns=cfg.prompt_columns,
                                          id_column=cfg.id_column)
      splits[split] = self._generate_examples(records)
    return splits

  def _generate_examples(self, records):
    for i, r in enumerate(records):
      yield i, {
          "id": r.id,
          "roles": [m[0] for m in r.messages],
          "contents": [m[1] for m in r.messages],
          "is_chat": r.is_chat,
          "source": r.source,
      }


def _fingerprint(split_files, prompt_columns, id_column) -> str:
  h = hashlib.sha256(repr((prompt_columns, id_column)).encode())
  for split, files in split_files:
    h.update(split.encode())
    for f in files:
      h.update(os.path.basename(f).encode())
      with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
          h.update(chunk)
  return h.hexdigest()[:16]


def make_prompt_builder(files: Sequence[str] | Mapping[str, Sequence[str]], data_dir: str, *,
                        prompt_columns: Sequence[str] = prompts.DEFAULT_PROMPT_COLUMNS,
                        id_column: str | None = "id", name: str | None = None
                        ) -> OnpoPromptCollection:
  """Returns the builder for `files` (a list means one 'train' split).

  The config name defaults to a hash of the file contents and read options, so a
  changed file gets a new dataset directory instead of silently reusing the old.

  Raises:
    FileNotFoundError: naming a missing file.
  """
  split_map = {"train": files} if isinstance(files, (list, tuple)) else dict(files)
  if not split_map or any(isinstance(v, str) or not v for v in split_map.values()):
    raise ValueError(f"files must be a non-empty list of paths or a {{split: [paths]}} "
                     f"mapping, got {files!r}")
  split_files = tuple((s, tuple(os.path.abspath(f) for f in fs))
                      for s, fs in sorted(split_map.items()))
  for _, fs in split_files:
    for f in fs:
      if not os.path.isfile(f):
        raise FileNotFoundError(f"prompt file {f!r} does not exist")
  if isinstance(prompt_columns, str):
    prompt_columns = (prompt_columns,)
  name = name or "p" + _fingerprint(split_files, tuple(prompt_columns), id_column)
  config = PromptCollectionConfig(name=name, version="1.0.0", split_files=split_files,
                                  prompt_columns=tuple(prompt_columns), id_column=id_column)
  return OnpoPromptCollection(config=config, data_dir=data_dir, file_format="array_record")


def build_prompt_data_source(files: Sequence[str] | Mapping[str, Sequence[str]],
                             data_dir: str, **kwargs):
  """Prepares (once) and opens the array_record prompt dataset.

  Returns:
    {split: random-access data source}; `len()` and `[i]` give example dicts.
  """
  builder = make_prompt_builder(files, data_dir, **kwargs)
  builder.download_and_prepare()
  return builder.as_data_source()


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def records_from_data_source(source) -> list[prompts.PromptRecord]:
  """Converts a data source split back into `PromptRecord`s, in stored order."""
  out = []
  for i in range(len(source)):
    ex = source[i]
    out.append(prompts.PromptRecord(
        id=_text(ex["id"]),
        messages=tuple(zip((_text(r) for r in ex["roles"]), (_text(c) for c in ex["contents"]))),
        is_chat=bool(ex["is_chat"]),
        source=_text(ex["source"])))
  return out
