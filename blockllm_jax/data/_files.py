"""Local text and instruction files, read with Hugging Face ``datasets``.

Files are read into memory with a throw-away cache folder, so nothing is
left in ``~/.cache/huggingface`` and no network is needed (the builders
used are the ones ``datasets`` ships).
"""

from __future__ import annotations

import contextlib
import csv
import tempfile
from pathlib import Path
from typing import Optional, Union

# File extension -> the ``datasets`` builder that reads it.
TEXT_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv"}
INSTRUCTION_BUILDERS = {k: v for k, v in TEXT_BUILDERS.items() if k != ".txt"}

# Column names tried, in order, when the fields are not given.
PROMPT_FIELDS = ("prompt", "instruction", "question", "input")
ANSWER_FIELDS = ("answer", "output", "response", "completion", "target")

DOCUMENT_SEPARATOR = "\n\n"


def load_text(path: Union[str, Path], text_field: str = "text") -> str:
  """One training text from a local file or folder of files.

  Args:
    path: a ``.txt`` file (one document; ``\\r\\n`` read as ``\\n``), a
      ``.json``/``.jsonl``/``.parquet``/``.csv`` file (one document per row,
      in ``text_field``), or a folder of such files (read in name order).
    text_field: the column holding the text in tabular files.

  Returns:
    The documents joined by a blank line (``"\\n\\n"``); missing (null)
    values are skipped.

  Example:
    >>> corpus = load_text("my_corpus.jsonl")  # doctest: +SKIP
  """
  documents = []
  for file in _files(path, TEXT_BUILDERS):
    table = _read_table(file, TEXT_BUILDERS)
    column = "text" if file.suffix.lower() == ".txt" else text_field
    for row, value in enumerate(_column(table, column, file, "text_field")):
      if value is None:
        continue
      if not isinstance(value, str):
        raise ValueError(f"{file}: row {row} of column {column!r} is "
                         f"{type(value).__name__}, not text.")
      documents.append(value)
  return DOCUMENT_SEPARATOR.join(documents)


def load_instructions(path: Union[str, Path], prompt_field: Optional[str] = None,
                      answer_field: Optional[str] = None) -> list:
  """(prompt, answer) string pairs from a local file or folder of files.

  Args:
    path: a ``.json``/``.jsonl``/``.parquet``/``.csv`` file with one
      example per row, or a folder of such files (read in name order).
    prompt_field: the prompt column; None takes the first present of
      :data:`PROMPT_FIELDS` (prompt, instruction, question, input).
    answer_field: the answer column; None takes the first present of
      :data:`ANSWER_FIELDS` (answer, output, response, completion, target).

  Returns:
    A list of ``(prompt, answer)`` tuples of str. Integer values (e.g. a
    JSON answer ``4``) become strings; CSV cells are read as text as is.

  Example:
    >>> pairs = load_instructions("pairs.jsonl")  # doctest: +SKIP
    >>> examples = encode_instructions(pairs, tokenizer)  # doctest: +SKIP
  """
  pairs = []
  for file in _files(path, INSTRUCTION_BUILDERS):
    table = _read_table(file, INSTRUCTION_BUILDERS)
    prompt_column = prompt_field or _detect(table, PROMPT_FIELDS, file, "prompt_field")
    answer_column = answer_field or _detect(table, ANSWER_FIELDS, file, "answer_field")
    if prompt_column == answer_column:
      raise ValueError(f"{file}: prompt and answer are both column {prompt_column!r}; "
                       "pass prompt_field and answer_field.")
    prompts = _column(table, prompt_column, file, "prompt_field")
    answers = _column(table, answer_column, file, "answer_field")
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
      pairs.append((_as_text(prompt, file, row, prompt_column),
                    _as_text(answer, file, row, answer_column)))
  return pairs


def _files(path, builders) -> list:
  """``path`` itself, or the readable files of the folder ``path``."""
  path = Path(path).expanduser()
  accepted = ", ".join(sorted(builders))
  if not path.exists():
    raise FileNotFoundError(f"No such file or folder: {path} (accepted files: {accepted}).")
  if path.is_dir():
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in builders and not p.name.startswith("."))
    if not files:
      raise ValueError(f"The folder {path} has no {accepted} files.")
    return files
  if path.suffix.lower() not in builders:
    raise ValueError(f"Cannot read {path}: unknown extension {path.suffix!r}; "
                     f"accepted: {accepted}.")
  return [path]


def _read_table(file: Path, builders):
  """The file as an in-memory ``datasets.Dataset``."""
  try:
    import datasets
  except ImportError:
    raise ImportError("Reading data files needs datasets: pip install "
                      "'blockllm_jax[examples]'.") from None

  suffix = file.suffix.lower()
  options = {}
  if suffix == ".txt":
    options["sample_by"] = "document"  # the whole file is one row
  elif suffix == ".csv":
    # Read every cell as text ("007" stays "007") and empty cells as "".
    with open(file, newline="", encoding="utf-8-sig") as f:
      header = next(csv.reader(f), None)
    if not header:
      raise ValueError(f"{file} is empty; a CSV file needs a header row.")
    options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    options["na_filter"] = False
  with tempfile.TemporaryDirectory(prefix="blockllm_datasets_") as cache_dir, _quiet(datasets):
    try:
      return datasets.load_dataset(builders[suffix], data_files=[str(file.resolve())],
                                   split="train", cache_dir=cache_dir, keep_in_memory=True,
                                   **options)
    except Exception as error:
      raise ValueError(f"Could not read {file} as {suffix} ({builders[suffix]} builder of "
                       f"datasets): {error}") from error


@contextlib.contextmanager
def _quiet(datasets):
  """No "Generating train split" progress bars while reading small files."""
  was_enabled = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()
  try:
    yield
  finally:
    if was_enabled:
      datasets.enable_progress_bars()


def _column(table, name, file, argument) -> list:
  if name not in table.column_names:
    raise ValueError(f"{file} has no column {name!r} ({argument}); its columns are "
                     f"{table.column_names}.")
  return table[name]


def _detect(table, candidates, file, argument) -> str:
  by_lower = {c.lower(): c for c in table.column_names}
  for name in candidates:
    if name in table.column_names:
      return name
    if name in by_lower:  # e.g. "Question"
      return by_lower[name]
  raise ValueError(f"{file}: none of the columns {table.column_names} is one of "
                   f"{list(candidates)}; pass {argument}.")


def _as_text(value, file, row, column) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  raise ValueError(f"{file}: row {row} of column {column!r} is {value!r}; "
                   "prompts and answers must be text.")
