"""Writing small LLaMA GGUF files in tests, the way llama.cpp's converter
(convert_hf_to_gguf.py) writes them: its tensor names, the Q/K row
permutation, byte-level BPE tokenizer metadata and a chat template."""

import json

import numpy as np

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "ffn_norm"}


def chatml_bpe(vocab_size=320, corpus_chars=60_000):
  """(tokens, merges, token types) of a byte-level BPE trained on the
  embedded corpus, with ChatML specials as ids 0-2 (as SmolLM2's)."""
  from tokenizers import Tokenizer
  from blockllm_jax import data
  trained = data.train_bpe_tokenizer([data.embedded_corpus()[:corpus_chars]],
                                     vocab_size=vocab_size)
  spec = json.loads(trained.hf_tokenizer.backend_tokenizer.to_str())
  vocab = Tokenizer.from_str(json.dumps(spec)).get_vocab()
  tokens = [None] * len(vocab)
  for token, index in vocab.items():
    tokens[index] = token
  # Our trainer's own specials come first: rename three ChatML's way (ids
  # kept); the fourth becomes a normal token.
  tokens[:3] = SPECIALS
  merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
  return tokens, merges, [3] * 3 + [1] * (len(tokens) - 3)


def permute_qk(weight, heads):
  """llama.cpp's converter: each head's rows (2, half) stored as (half, 2)."""
  return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(path, config, tensors, bpe, qtype_name="F32", pre="gpt2",
                     arch="llama", extra=()):
  """Writes a LLaMA GGUF file.

  Args:
    path: the file.
    config: HF config fields (vocab_size, hidden_size, intermediate_size,
      num_hidden_layers, num_attention_heads, num_key_value_heads,
      rope_theta, rms_norm_eps, max_position_embeddings,
      tie_word_embeddings).
    tensors: HF tensor name -> float32 NumPy array (PyTorch layout).
    bpe: from :func:`chatml_bpe`.
    qtype_name: GGML type of the matrices (1-D tensors stay F32).
    pre, arch: the tokenizer.ggml.pre and general.architecture values.
    extra: more GGUF tensors, name -> array.
  """
  import gguf
  c = config
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(c["num_hidden_layers"])
  writer.add_context_length(c["max_position_embeddings"])
  writer.add_embedding_length(c["hidden_size"])
  writer.add_feed_forward_length(c["intermediate_size"])
  writer.add_head_count(c["num_attention_heads"])
  writer.add_head_count_kv(c["num_key_value_heads"])
  writer.add_rope_freq_base(c["rope_theta"])
  writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
  writer.add_vocab_size(c["vocab_size"])
  writer.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
  tokens, merges, types = bpe
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(2)
  writer.add_chat_template(CHATML)
  out = {"token_embd.weight": tensors["model.embed_tokens.weight"],
         "output_norm.weight": tensors["model.norm.weight"]}
  if not c["tie_word_embeddings"]:
    out["output.weight"] = tensors["lm_head.weight"]
  for n in range(c["num_hidden_layers"]):
    for hf, name in _NAMES.items():
      weight = np.asarray(tensors[f"model.layers.{n}.{hf}.weight"], np.float32)
      if name == "attn_q":
        weight = permute_qk(weight, c["num_attention_heads"])
      elif name == "attn_k":
        weight = permute_qk(weight, c["num_key_value_heads"])
      out[f"blk.{n}.{name}.weight"] = weight
  out.update(extra)
  qtype = gguf.GGMLQuantizationType[qtype_name]
  for name, weight in out.items():
    weight = np.asarray(weight, np.float32)
    if weight.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      quantised = gguf.quants.quantize(weight, qtype)
      writer.add_tensor(name, quantised, raw_shape=quantised.shape, raw_dtype=qtype)
    else:
      writer.add_tensor(name, weight)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
