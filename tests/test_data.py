"""Tokenizers, instruction sets, LM batches and local files of blockllm_jax.data."""

import json

import numpy as np
import pytest

from blockllm_jax import data

ROUND_TRIP_TEXTS = [
    "",
    "hello world",
    "  leading, trailing and  double  spaces  ",
    "naïve café, Ünïcödé: 日本語のテキスト, emoji 😀👍🏽, math ∑∫≠",
    "tabs\tand\r\nnewlines\n\n\x00\x7f",
    "def f(x):\n  return {'a': x ** 2}  # comment",
    "HTML <s>strike</s> and <pad> <sep> look like specials",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A 512-token BPE trained on the embedded corpus, saved to a folder."""
  needs_hugging_face()
  folder = tmp_path_factory.mktemp("bpe")
  tokenizer = data.train_bpe_tokenizer([data.embedded_corpus()], vocab_size=512,
                                       save_dir=folder)
  tokenizer.folder = folder
  return tokenizer


@pytest.fixture(scope="module")
def llama_style_folder(tmp_path_factory):
  """A checkpoint-like folder whose tokenizer has <s> and </s> but no pad or sep."""
  needs_hugging_face()
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(
      [data.embedded_corpus()[:20_000]],
      trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                          show_progress=False))
  folder = tmp_path_factory.mktemp("llama")
  tokenizer.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
       "unk_token": "<unk>"}))
  (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 300}))
  return folder


def needs_hugging_face(*extra):
  """Skips where the optional ``examples`` packages are not installed."""
  for module in ("tokenizers", "transformers", *extra):
    pytest.importorskip(module)


def tokenizer_named(name, request):
  """The ByteTokenizer, or the trained BPE (only built when asked for)."""
  return data.ByteTokenizer() if name == "byte" else request.getfixturevalue("bpe")


# Tokenizer protocol and ByteTokenizer.


def test_byte_tokenizer_keeps_its_ids_and_implements_the_protocol():
  tok = data.ByteTokenizer()
  assert (tok.PAD, tok.BOS, tok.EOS, tok.SEP, tok.vocab_size) == (256, 257, 258, 259, 260)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (256, 257, 258, 259)
  assert isinstance(tok, data.Tokenizer)
  assert tok.encode("hé") == [104, 195, 169]
  assert tok.decode([257, 104, 195, 169, 258, 256]) == "hé"


def test_an_object_without_the_protocol_is_rejected_by_name():
  class NoIds:
    def encode(self, text):
      return []

  with pytest.raises(TypeError, match=r"NoIds lacks \['vocab_size', 'pad_id'"):
    data.make_instruction_set(2, tokenizer=NoIds())


# BPE training, saving and loading.


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_bpe_round_trips_any_text(bpe, text):
  ids = bpe.encode(text)
  assert all(0 <= i < bpe.vocab_size for i in ids)
  assert bpe.decode(ids) == text
  # Special-token strings in text are text, not control tokens.
  assert not {bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.sep_id} & set(ids)


def test_bpe_has_the_documented_specials_and_vocab(bpe):
  assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.sep_id) == (0, 1, 2, 3)
  assert bpe.vocab_size == 512 == len(bpe.hf_tokenizer)
  assert isinstance(bpe, data.Tokenizer)
  assert bpe.decode([bpe.bos_id, *bpe.encode("x y"), bpe.sep_id, bpe.eos_id, bpe.pad_id]) == "x y"
  assert bpe.encode_batch(["ab", "c d"]) == [bpe.encode("ab"), bpe.encode("c d")]


def test_bpe_compresses_the_corpus(bpe):
  corpus = data.embedded_corpus()
  num_tokens = len(bpe.encode(corpus))
  assert num_tokens < 0.6 * len(corpus.encode("utf-8"))


def test_bpe_training_is_deterministic(bpe):
  again = data.train_bpe_tokenizer(data.embedded_corpus(), vocab_size=512)
  text = data.embedded_corpus()[:5000]
  assert again.encode(text) == bpe.encode(text)


@pytest.mark.parametrize("loader", ["fast_from_file", "auto_from_folder"])
def test_saved_bpe_loads_in_transformers_with_the_same_ids(bpe, loader):
  from transformers import AutoTokenizer, PreTrainedTokenizerFast
  if loader == "fast_from_file":
    hf = PreTrainedTokenizerFast(tokenizer_file=str(bpe.folder / "tokenizer.json"))
  else:
    hf = AutoTokenizer.from_pretrained(str(bpe.folder))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.sep_token_id) == (0, 1, 2, 3)
  assert len(hf) == bpe.vocab_size
  for text in ROUND_TRIP_TEXTS[:6]:
    assert hf.encode(text, add_special_tokens=False) == bpe.encode(text)
    assert hf.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("target", ["folder", "file"])
def test_load_tokenizer_gives_the_trained_tokenizer(bpe, target):
  path = bpe.folder if target == "folder" else bpe.folder / "tokenizer.json"
  loaded = data.load_tokenizer(path)
  assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.sep_id) == (
      bpe.vocab_size, bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.sep_id)
  text = data.embedded_corpus()[:3000]
  assert loaded.encode(text) == bpe.encode(text)


def test_load_tokenizer_of_a_llama_style_folder_pads_with_eos(llama_style_folder, tmp_path):
  tok = data.load_tokenizer(llama_style_folder)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.sep_id, tok.vocab_size) == (1, 2, 2, None, 300)
  # Saving and reloading keeps the ids.
  again = data.load_tokenizer(tok.save(tmp_path / "export"))
  assert (again.bos_id, again.eos_id, again.pad_id, again.sep_id) == (1, 2, 2, None)


def test_load_tokenizer_errors(tmp_path, llama_style_folder):
  with pytest.raises(FileNotFoundError, match="missing"):
    data.load_tokenizer(tmp_path / "missing")
  (tmp_path / "tokenizer.model").write_bytes(b"")
  with pytest.raises(ValueError, match=r"has no tokenizer.json .*tokenizer.model"):
    data.load_tokenizer(tmp_path)
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json is not a tokenizers JSON file"):
    data.load_tokenizer(tmp_path / "bad.json")
  # A tokenizer whose only special token is <unk> has no end of sequence.
  spec = json.loads((llama_style_folder / "tokenizer.json").read_text())
  spec["added_tokens"] = spec["added_tokens"][:1]
  (tmp_path / "no_eos.json").write_text(json.dumps(spec))
  with pytest.raises(ValueError, match=r"no end-of-sequence token.*\['<unk>'\]"):
    data.load_tokenizer(tmp_path / "no_eos.json")


@pytest.mark.parametrize("kwargs, message", [
    (dict(texts=[], vocab_size=512), "texts is empty"),
    (dict(texts=["a", 3], vocab_size=512), r"texts\[1\] must be a string"),
    (dict(texts=["abc"], vocab_size=100), "vocab_size must be an int of at least 260"),
    (dict(texts=["abc"], vocab_size=512, min_frequency=0), "min_frequency"),
])
def test_train_bpe_tokenizer_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.train_bpe_tokenizer(**kwargs)


# Instruction sets.


def check_instruction_set(examples, tok, separator):
  """Rows are BOS prompt separator answer EOS PAD..., the mask exactly answer+EOS."""
  for tokens, mask, start, answer in zip(*examples):
    answer_ids = tok.encode(answer)
    end = start + len(answer_ids) + 1
    assert tokens[0] == tok.bos_id
    assert list(tokens[start - len(separator):start]) == separator
    assert list(tokens[start:end]) == answer_ids + [tok.eos_id]
    assert np.all(tokens[end:] == tok.pad_id)
    assert np.array_equal(mask, (np.arange(len(tokens)) >= start) & (np.arange(len(tokens)) < end))
    assert tok.decode(tokens[mask > 0]) == answer
    assert tok.decode(tokens[start:end - 1]) == answer


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_generated_instruction_sets_mask_exactly_the_answer(request, name):
  tok = tokenizer_named(name, request)
  examples = data.make_instruction_set(400, seed=1, tokenizer=tok)
  assert examples.tokens.shape == (400, 24) and examples.tokens.dtype == np.int32
  assert len(set(examples.answers)) > 300
  check_instruction_set(examples, tok, [tok.sep_id])
  # Same seed, same prompts, whatever the tokenizer.
  assert examples.answers == data.make_instruction_set(400, seed=1).answers


def test_bpe_never_needs_more_tokens_than_bytes_on_the_tasks(bpe):
  byte = data.make_instruction_set(1000, seed=2)
  tokens = data.make_instruction_set(1000, seed=2, tokenizer=bpe)
  assert np.all(tokens.prompt_length <= byte.prompt_length)
  assert (tokens.loss_mask.sum() < byte.loss_mask.sum())


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_encode_instructions_with_a_separator_token(request, name):
  tok = tokenizer_named(name, request)
  pairs = [("capital of France?", "Paris"), ("2+2=", "4"), ("échange", "exchange 😀"),
           ("empty answer", "")]
  examples = data.encode_instructions(pairs, tok)
  longest = max(2 + len(tok.encode(p)) + len(tok.encode(a)) + 1 for p, a in pairs)
  assert examples.tokens.shape == (4, longest)
  assert examples.answers == [a for _, a in pairs]
  assert list(examples.prompt_length) == [len(tok.encode(p)) + 2 for p, _ in pairs]
  check_instruction_set(examples, tok, [tok.sep_id])
  assert data.encode_instructions(pairs, tok, seq_len=40).tokens.shape == (4, 40)


def test_encode_instructions_without_a_separator_token_uses_a_newline(llama_style_folder):
  tok = data.load_tokenizer(llama_style_folder)
  newline = tok.encode("\n")
  examples = data.encode_instructions([("reverse abc", "cba"), ("add 2+3", "5")], tok)
  check_instruction_set(examples, tok, newline)
  assert list(examples.prompt_length) == [1 + len(tok.encode(p)) + len(newline)
                                          for p in ("reverse abc", "add 2+3")]
  assert tok.decode(examples.tokens[0, :examples.prompt_length[0]]) == "reverse abc\n"


@pytest.mark.parametrize("pairs, kwargs, message", [
    ([("a", "b"), ("a much longer prompt", "answer")], dict(seq_len=8),
     r"seq_len=8 is too short for pairs\[1\] \(prompt 'a much longer prompt'\), which needs 29"),
    ([], {}, "pairs is empty"),
    ("ab", {}, "pairs must be a sequence"),
    ([("a", "b"), ("only prompt",)], {}, r"pairs\[1\] must be a \(prompt, answer\) pair"),
    ([("a", 4)], {}, r"pairs\[0\] must be"),
    ([("a", "b")], dict(seq_len=0), "seq_len must be a positive int or None"),
])
def test_encode_instructions_errors(pairs, kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.encode_instructions(pairs, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num=4, tasks=("reverse", "divide")), r"Unknown tasks \['divide'\]"),
    (dict(num=4, seq_len=10), "seq_len=10 is too short for generated example"),
    (dict(num=10_001, tasks="add"), "num=10001 is more than the distinct prompts"),
])
def test_make_instruction_set_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.make_instruction_set(**kwargs)


# Language-model batches.


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_language_model_batches_are_windows_of_the_encoded_text(request, name):
  tok = tokenizer_named(name, request)
  corpus = data.embedded_corpus()
  encoded = np.asarray(tok.encode(corpus))
  batches = data.language_model_batches(corpus, 32, 4, seed=5, tokenizer=tok)
  for _ in range(3):
    batch = next(batches)
    assert batch.shape == (4, 32) and batch.dtype == np.int32
    assert batch.min() >= 0 and batch.max() < tok.vocab_size
    for row in batch:  # each row is a contiguous slice of the encoding
      starts = np.flatnonzero(encoded[:len(encoded) - 31] == row[0])
      assert any(np.array_equal(encoded[s:s + 32], row) for s in starts)
  again = data.language_model_batches(corpus, 32, 4, seed=5, tokenizer=tok)
  assert np.array_equal(next(again), next(data.language_model_batches(
      corpus, 32, 4, seed=5, tokenizer=tok)))


@pytest.mark.parametrize("args, message", [
    (("short", 5, 2), "The text has 5 bytes; need more than seq_len=5"),
    (("some text", 0, 2), "seq_len must be a positive int"),
    (("some text", 2, 0), "batch_size must be a positive int"),
])
def test_language_model_batches_errors_up_front(args, message):
  with pytest.raises(ValueError, match=message):
    data.language_model_batches(*args)


# Local files through datasets.


ROWS = [{"question": "double 7", "response": "14", "id": 0},
        {"question": "naïve?", "response": "007", "id": 1},
        {"question": "", "response": "x,y \"quoted\"", "id": 2}]


def write_table(path, rows):
  """Writes ``rows`` (dicts) as .json/.jsonl/.parquet/.csv by the suffix of ``path``."""
  pytest.importorskip("datasets")
  pd = pytest.importorskip("pandas")
  if path.suffix == ".jsonl":
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
  elif path.suffix == ".json":
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
  elif path.suffix == ".parquet":
    pd.DataFrame(rows).to_parquet(path)
  else:
    pd.DataFrame(rows).to_csv(path, index=False)
  return path


FORMATS = ["jsonl", "json", "parquet", "csv"]


@pytest.mark.parametrize("ext", FORMATS)
def test_load_instructions_auto_detects_the_columns(tmp_path, ext):
  path = write_table(tmp_path / f"pairs.{ext}", ROWS)
  assert data.load_instructions(path) == [(r["question"], r["response"]) for r in ROWS]


@pytest.mark.parametrize("ext", FORMATS)
def test_load_instructions_with_explicit_fields(tmp_path, ext):
  rows = [{"q": r["question"], "a": r["response"], "prompt": "decoy"} for r in ROWS]
  path = write_table(tmp_path / f"pairs.{ext}", rows)
  assert data.load_instructions(path, prompt_field="q", answer_field="a") == [
      (r["question"], r["response"]) for r in ROWS]


def test_load_instructions_detection_order_and_case(tmp_path):
  rows = [{"Instruction": "sort 312", "input": "unused", "Output": "123"}]
  assert data.load_instructions(write_table(tmp_path / "a.jsonl", rows)) == [("sort 312", "123")]
  rows = [{"prompt": "p", "completion": "c", "target": "t"}]
  assert data.load_instructions(write_table(tmp_path / "b.jsonl", rows)) == [("p", "c")]


def test_load_instructions_json_numbers_become_text(tmp_path):
  path = write_table(tmp_path / "n.jsonl", [{"prompt": "add 2+2", "answer": 4}])
  assert data.load_instructions(path) == [("add 2+2", "4")]


def test_load_instructions_of_a_folder_reads_every_file_in_order(tmp_path):
  write_table(tmp_path / "b.csv", ROWS[1:])
  write_table(tmp_path / "a.jsonl", ROWS[:1])
  (tmp_path / "notes.md").write_text("ignored")
  assert data.load_instructions(tmp_path) == [(r["question"], r["response"]) for r in ROWS]


def test_loaded_pairs_make_an_instruction_set(tmp_path, bpe):
  pairs = data.load_instructions(write_table(tmp_path / "pairs.parquet", ROWS))
  examples = data.encode_instructions(pairs, bpe)
  check_instruction_set(examples, bpe, [bpe.sep_id])


@pytest.mark.parametrize("ext", FORMATS)
def test_load_text_joins_documents(tmp_path, ext):
  docs = [{"text": "First document.\nTwo lines."}, {"text": "Second: naïve 😀"}]
  path = write_table(tmp_path / f"corpus.{ext}", docs)
  assert data.load_text(path) == "First document.\nTwo lines.\n\nSecond: naïve 😀"


def test_load_text_of_txt_files_and_folders(tmp_path):
  pytest.importorskip("datasets")
  (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
  (tmp_path / "a.txt").write_text("first file\n\nwith paragraphs 日本\n", encoding="utf-8")
  assert data.load_text(tmp_path / "a.txt") == "first file\n\nwith paragraphs 日本\n"
  assert data.load_text(tmp_path) == "first file\n\nwith paragraphs 日本\n\n\nsecond file\n"


def test_load_text_with_a_text_field_and_nulls(tmp_path):
  path = write_table(tmp_path / "c.jsonl", [{"body": "one"}, {"body": None}, {"body": "two"}])
  assert data.load_text(path, text_field="body") == "one\n\ntwo"


def test_file_loading_leaves_no_cache_behind(tmp_path, monkeypatch):
  import tempfile

  pytest.importorskip("datasets")
  import datasets.config
  home = tmp_path / "hf_home"
  for name in ("HF_CACHE_HOME", "HF_DATASETS_CACHE", "HF_MODULES_CACHE",
               "DOWNLOADED_DATASETS_PATH", "EXTRACTED_DATASETS_PATH"):
    monkeypatch.setattr(datasets.config, name, str(home / name))
  temp = tmp_path / "tmp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  for ext in FORMATS:
    data.load_instructions(write_table(tmp_path / f"pairs.{ext}", ROWS))
  (tmp_path / "a.txt").write_text("text")
  data.load_text(tmp_path / "a.txt")
  assert not home.exists()
  assert list(temp.iterdir()) == []


@pytest.mark.parametrize("call, error, message", [
    (lambda d: data.load_text(d / "missing.txt"), FileNotFoundError,
     "No such file or folder: .*missing.txt"),
    (lambda d: data.load_text(d / "corpus.md"), ValueError,
     r"unknown extension '.md'; accepted: .csv, .json, .jsonl, .parquet, .txt"),
    (lambda d: data.load_instructions(d / "corpus.txt"), ValueError,
     r"unknown extension '.txt'; accepted: .csv, .json, .jsonl, .parquet\."),
    (lambda d: data.load_instructions(d / "empty"), ValueError,
     "The folder .*empty has no .csv, .json, .jsonl, .parquet files"),
    (lambda d: data.load_text(d / "pairs.jsonl"), ValueError,
     r"has no column 'text' \(text_field\); its columns are \['question', 'response', 'id'\]"),
    (lambda d: data.load_instructions(d / "pairs.jsonl", answer_field="reply"), ValueError,
     r"has no column 'reply' \(answer_field\); its columns are \['question', 'response', 'id'\]"),
    (lambda d: data.load_instructions(d / "odd.jsonl"), ValueError,
     r"none of the columns \['q', 'response'\] is one of \['prompt', .*pass prompt_field"),
    (lambda d: data.load_instructions(d / "odd.jsonl", prompt_field="response"), ValueError,
     "prompt and answer are both column 'response'"),
    (lambda d: data.load_instructions(d / "null.jsonl"), ValueError,
     r"row 1 of column 'answer' is None; prompts and answers must be text"),
    (lambda d: data.load_instructions(d / "broken.jsonl"), ValueError,
     r"Could not read .*broken.jsonl as .jsonl"),
    (lambda d: data.load_instructions(d / "blank.csv"), ValueError,
     "blank.csv is empty"),
])
def test_file_errors(tmp_path, call, error, message):
  write_table(tmp_path / "pairs.jsonl", ROWS)
  write_table(tmp_path / "odd.jsonl", [{"q": "a", "response": "b"}])
  write_table(tmp_path / "null.jsonl", [{"prompt": "a", "answer": "b"},
                                        {"prompt": "c", "answer": None}])
  (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "answer": ')
  (tmp_path / "blank.csv").write_text("")
  (tmp_path / "corpus.md").write_text("# notes")
  (tmp_path / "corpus.txt").write_text("text")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.md").write_text("x")
  with pytest.raises(error, match=message):
    call(tmp_path)
