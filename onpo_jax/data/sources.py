"""One entry point for every prompt source: plain files, an HF datasets dir, TFDS.

`load_prompt_records` is what configs name (`source`, `paths`, ...). It sits
above both readers: `prompts` reads files and HF directories, `tfds_builder`
prepares and reads the TFDS array_record collection (reading the files through
`prompts`). Imports run one way: sources -> tfds_builder -> prompts.
"""

from __future__ import annotations

import os
from typing import Sequence

from onpo_jax.data import prompts
from onpo_jax.data import tfds_builder


PROMPT_SOURCES = ("files", "hf_dir", "tfds")


def load_prompt_records(source: str, paths: str | Sequence[str], *, split: str = "train",
                        data_dir: str | None = None,
                        prompt_columns: Sequence[str] = prompts.DEFAULT_PROMPT_COLUMNS,
                        id_column: str | None = "id") -> list[prompts.PromptRecord]:
  """Loads prompts from any supported source (the entry point for configs).

  Args:
    source: 'files' (JSONL / parquet / arrow files read directly), 'hf_dir' (a
      local HF datasets directory, `paths` is that directory) or 'tfds' (the
      files prepared once as array_record under `data_dir`, then read back with
      `as_data_source`).
    paths: a file, a list of files, or the HF directory.
    split: split to read ('hf_dir' and 'tfds'; the 'tfds' files all go to it).
    data_dir: TFDS data directory (required for 'tfds').
    prompt_columns, id_column: as in `read_prompt_file`.

  Raises:
    ValueError: naming `source` / `data_dir` when they are invalid.
    TypeError: `paths` is neither a path nor a list of paths.
  """
  kw = dict(prompt_columns=prompt_columns, id_column=id_column)
  if isinstance(paths, (str, os.PathLike)):
    files = [os.fspath(paths)]
  elif isinstance(paths, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in paths):
    files = [os.fspath(p) for p in paths]
  else:
    # list() of an int fails without saying which argument; of a dict it takes the keys.
    raise TypeError(f"paths must be a path or a list of paths, got {paths!r:.80}")
  if source == "files":
    return prompts.read_prompt_files(files, **kw)
  if source == "hf_dir":
    if len(files) != 1:
      raise ValueError(f"source='hf_dir' takes one directory, got {paths!r}")
    return prompts.load_hf_dataset_dir(files[0], split, **kw)
  if source == "tfds":
    if not data_dir:
      raise ValueError("source='tfds' needs data_dir (where the array_record files go)")
    ds = tfds_builder.build_prompt_data_source({split: files}, data_dir, **kw)
    return tfds_builder.records_from_data_source(ds[split])
  raise ValueError(f"source must be one of {PROMPT_SOURCES}, got {source!r}")
