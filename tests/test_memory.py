"""Memory structure: state bytes and XLA's compiled memory analysis on CPU."""

import jax
import optax
import pytest

import blockllm_jax as bl
from tests import tiny_models

EVERYTHING = lambda path, leaf: True


def _step_memory(tx, params, loss_fn):
  state = tx.init(params)
  step = tiny_models.train_step_fn(tx, loss_fn)
  return bl.compiled_memory(step, params, state, donate_argnums=(0, 1)), state


@pytest.mark.parametrize("clip", [False, True])
def test_transformer_step_saves_about_the_moment_bytes(clip):
  params = tiny_models.transformer_params(jax.random.PRNGKey(0), width=96,
                                          layers=3, vocab=256)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 33), 0, 256)
  loss_fn = lambda p: tiny_models.transformer_loss(p, tokens)
  prefix = [optax.clip_by_global_norm(1.0)] if clip else []
  adamw, adamw_state = _step_memory(
      optax.chain(*prefix, optax.adamw(1e-3)), params, loss_fn)
  ours, our_state = _step_memory(
      optax.chain(*prefix, bl.blockllm(1e-3, sparsity=0.9, eligible=EVERYTHING)),
      params, loss_fn)
  moment_saving = bl.state_bytes(adamw_state) - bl.state_bytes(our_state)
  saving = adamw.total - ours.total
  # The arguments shrink by exactly the state difference ...
  assert adamw.argument - ours.argument == moment_saving
  # ... and the temporaries (the gradient tree, activations) are about
  # AdamW's: not more (no copy of the gradients or the moments) ...
  assert 0.9 * moment_saving <= saving, (saving, moment_saving, adamw, ours)
  # ... and not far less, since both hold the same gradient tree. (XLA
  # schedules the two programs differently: without clipping ours come
  # out 7% below AdamW's, 4.14 against 4.46 MB.)
  assert ours.temp >= 0.9 * adamw.temp, (adamw, ours)


def test_update_alone_needs_no_second_copy_of_the_moments():
  params = tiny_models.transformer_params(jax.random.PRNGKey(0), width=96,
                                          layers=8)
  tx = bl.scale_by_blockllm(0.9, eligible=EVERYTHING)
  state = tx.init(params)
  update = lambda g, s, p: tx.update(g, s, p, value=1.0)
  memory = bl.compiled_memory(update, params, state, params, donate_argnums=(1,))
  moment_bytes = state.mu.nbytes + state.nu.nbytes
  largest_leaf = max(p.nbytes for p in jax.tree.leaves(params))
  # Reselection repacks the moments in place: temporaries stay below the
  # per-leaf working set, far from another pair of moment buffers.
  assert memory.temp < moment_bytes, (memory, moment_bytes)
  assert memory.temp <= 8 * largest_leaf, (memory, largest_leaf)
  assert memory.alias >= moment_bytes  # the moments are updated in place


# ---------------------------------------------------- the memory estimator --

from blockllm_jax import memory as estimator  # noqa: E402
from blockllm_jax import models  # noqa: E402

_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=344,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _direct_step(settings, lean):
  """The same train step written out by hand (a user's script)."""
  model = models.LlamaForCausalLM(settings)
  params = model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), "int32"))["params"]
  tx = bl.blockllm(1e-5, sparsity=0.9) if lean else optax.adamw(1e-5)
  loss_fn = lambda p, t: models.causal_lm_loss(model.apply({"params": p}, t), t)

  def step(params, state, tokens):
    if lean:
      loss, grads = bl.lean_value_and_grad(loss_fn)(params, state, tokens)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss
  return step, params, tx.init(params)


@pytest.mark.parametrize("method", ["adamw", "blockllm-lean"])
def test_estimator_agrees_with_a_direct_compile(method):
  settings = models.LlamaSettings(**_TINY)
  config = estimator.StepConfig(method, batch=2, seq=64, param_dtype="float32")
  estimate = estimator.estimate(settings, config)
  step, params, state = _direct_step(settings, lean=method.endswith("-lean"))
  tokens = jax.numpy.zeros((2, 64), "int32")
  direct = bl.compiled_memory(step, params, state, tokens, donate_argnums=(0, 1))
  assert estimate.xla == direct
  assert estimate.xla_is_exact and estimate.instrument == "XLA:CPU"
  # The exact parts are the real arrays' bytes.
  assert estimate.weights == bl.state_bytes(params)
  assert estimate.state == bl.state_bytes(state)
  assert estimate.num_params == sum(x.size for x in jax.tree.leaves(params))
  if method == "adamw":
    assert estimate.gradient == estimate.weights
  else:  # folded into the moments as it arrives: the largest leaf (MLP)
    assert estimate.gradient == 128 * 344 * 4


@pytest.mark.parametrize("layout", [dict(), dict(scan_layers=True, remat=True)])
def test_estimator_memory_model_is_close_to_xla_in_float32(layout):
  """The counted total (activations by formula) against XLA:CPU's float32
  analysis of the same step: within 12% (measured 0.91-1.08)."""
  settings = models.LlamaSettings(**dict(_TINY, num_hidden_layers=4), **layout)
  for method in ("adamw", "blockllm", "blockllm-lean"):
    e = estimator.estimate(settings, estimator.StepConfig(
        method, batch=2, seq=128, param_dtype="float32"))
    assert 0.88 <= e.total / e.xla.total <= 1.12, (method, e)
  # Rematerialised layers keep their inputs and one layer's activations.
  four = dict(_TINY, num_hidden_layers=4)
  plain = estimator.activation_bytes(models.LlamaSettings(**four), 2, 128, "float32")
  remat = estimator.activation_bytes(models.LlamaSettings(**four, remat=True), 2,
                                     128, "float32")
  head = 2 * 4 * 256 * 128 + 3 * 4 * 256 * 512
  assert remat - head == (plain - head) // 4 + 4 * (4 * 256 * 128)


def test_estimator_labels_a_bfloat16_cpu_compile_as_its_float32_twin():
  settings = models.LlamaSettings(**_TINY)
  bf16 = estimator.estimate(settings, estimator.StepConfig(
      "badam-lean", batch=1, seq=32, param_dtype="bfloat16"))
  f32 = estimator.estimate(settings, estimator.StepConfig(
      "badam-lean", batch=1, seq=32, param_dtype="float32"))
  assert not bf16.xla_is_exact and "float32 twin" in bf16.instrument
  assert bf16.xla == f32.xla  # what was compiled is the float32 step
  assert bf16.weights * 2 == f32.weights
  assert bf16.peak == bf16.total  # fits by the model, not by XLA:CPU's bf16
  assert f32.peak == f32.xla.total


def test_estimator_7b_memory_model():
  """Hand-computed LLaMA-7B figures (no compile)."""
  settings = estimator.settings_for("llama-7b", remat=True)
  n = 6_738_415_616  # LLaMA-7B parameters (untied 32000-token head)
  adamw = estimator.estimate(settings, estimator.StepConfig("adamw"), compile=False)
  assert adamw.num_params == n and adamw.weights == 2 * n
  assert adamw.state == 4 * n + 4  # optax keeps mu, nu in the weights' dtype
  lean = estimator.estimate(settings, estimator.StepConfig(
      "blockllm-lean", sparsity=0.95, moment_dtype="bfloat16"), compile=False)
  eligible = n - 2 * 32000 * 4096  # embeddings and head are not eligible
  capacity = lean.state // 4  # two bf16 moments; the rest of the state is tiny
  assert abs(capacity - 0.05 * eligible) < 0.002 * eligible
  assert lean.fits(24) and not adamw.fits(40) and adamw.fits(80)


def test_estimator_reads_architectures_without_weights(tmp_path):
  settings = models.LlamaSettings(**_TINY)
  params = models.LlamaForCausalLM(settings).init(
      jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), "int32"))["params"]
  models.save_hf_checkpoint(tmp_path, settings, params)
  (tmp_path / "model.safetensors").unlink()  # config.json is all it reads
  read = estimator.settings_for(model_dir=tmp_path, remat=True)
  assert read.hidden_size == 128 and read.num_key_value_heads == 2 and read.remat
  with pytest.raises(ValueError, match="exactly one"):
    estimator.settings_for("llama-7b", model_dir=tmp_path)
  with pytest.raises(ValueError, match="preset"):
    estimator.settings_for("llama-70b")


@pytest.mark.parametrize("field, value, match", [
    ("method", "sgd", "`method` must be one of"),
    ("sparsity", 1.0, r"`sparsity` must be in \[0, 1\)"),
    ("moment_dtype", "int8", "`moment_dtype` must be a float dtype"),
    ("seq", 0, "`seq` must be >= 1"),
])
def test_estimator_rejects_bad_input(field, value, match):
  with pytest.raises(ValueError, match=match):
    estimator.StepConfig(**{field: value})


def test_estimator_command_line(capsys):
  estimates = estimator.main(["--preset", "smollm2-135m", "--no-compile",
                              "--method", "adamw", "blockllm-lean", "--seq", "256"])
  out = capsys.readouterr().out
  assert [e.method for e in estimates] == ["adamw", "blockllm-lean"]
  assert "fits (GB)" in out and "blockllm-lean" in out
  # Scanned layers: a lean step holds one layer's slice of a stacked leaf.
  scanned, = estimator.main(["--preset", "llama-7b", "--scan-layers",
                             "--method", "blockllm-lean", "--no-compile"])
  assert scanned.gradient == 4096 * 11008 * 2  # one MLP projection, bf16
