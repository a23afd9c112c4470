"""config.dtype = bfloat16: bf16 activations and matmuls; float32 params, optimizer
state, LayerNorm, softmax statistics and losses; a step whose loss is float32's.

The helpers at the top (no `test_` prefix) are reused by test_remat.py.
"""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from clusjax.models.clus import build_model, padded_vocab_size
from clusjax.parallel.mesh import create_mesh, rules_from_config
from clusjax.train.loop import compile_train_step
from clusjax.train.optimizer import make_optimizer
from clusjax.train.state import abstract_state, dummy_batch, init_state
from clusjax.train.objective import TextIds, compute_losses
from tests.conftest import micro_config

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
PAD_ID, CLS_ID = 0, 1


def vocab(config):
  """Stands in for the tokenizer: its special ids (as clusjax.data.Tokenizer's) and size."""
  return types.SimpleNamespace(pad_id=PAD_ID, cls_id=CLS_ID, sep_id=2, mask_id=3,
                               vocab_size=config.data.vocab_size)


def random_batch(config, seed=0):
  """A batch of the config's shapes: random images, captions of random length and
  prompt labels over 5 nouns (the step's objective does not need real data)."""
  rng = np.random.default_rng(seed)
  b, length = config.train.batch_size, config.data.max_text_len
  batch = dummy_batch(config, b)
  batch["image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
  mask = np.arange(length)[None, :] < rng.integers(4, length + 1, (b, 1))
  ids = rng.integers(4, config.data.vocab_size, (b, length), dtype=np.int32)
  ids[:, 0] = CLS_ID
  batch["text_ids"], batch["text_mask"] = np.where(mask, ids, PAD_ID), mask
  if "label_ids" in batch:
    batch["label_ids"] = rng.integers(4, config.data.vocab_size, batch["label_ids"].shape,
                                      dtype=np.int32)
    batch["label_noun"] = rng.integers(1, 6, batch["label_noun"].shape, dtype=np.int32)
    batch["caption_nouns"] = rng.integers(0, 6, batch["caption_nouns"].shape, dtype=np.int32)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def init_params(config):
  """The model's float32 params at config.seed (the same values for any dtype or remat)."""
  model = build_model(config, config.data.vocab_size)
  b = dummy_batch(config)
  init = jax.jit(lambda r: model.init(r, b["image"], b["text_ids"], b["text_mask"]))
  return nn.unbox(init(jax.random.key(config.seed))["params"])


def loss_fn(config):
  """params -> (total loss, per-term dict) of the config's objective on random_batch."""
  model = build_model(config, config.data.vocab_size)
  batch = random_batch(config)
  text_ids = TextIds.of(vocab(config))
  active = jnp.arange(config.clustering.max_prototypes) < config.clustering.num_prototypes

  def loss(params):
    total, (terms, _) = compute_losses(model, params, batch, jax.random.key(1), config,
                                       text_ids, active)
    return total, terms
  return loss


def all_eqns(jaxpr):
  """The equations of `jaxpr` and of every jaxpr nested in them (remat, jit, custom_vjp)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, (ClosedJaxpr, Jaxpr)):
          yield from all_eqns(sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub)


def test_bfloat16_matmuls_with_float32_statistics(tmp_path):
  """In the forward and backward pass of the whole objective."""
  config = micro_config(tmp_path, dtype="bfloat16")
  params = init_params(config)
  fn = loss_fn(config)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: fn(p)[0]))(params).jaxpr
  eqns = list(all_eqns(jaxpr))
  dots = [e for e in eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
  operands = [{v.aval.dtype for v in e.invars} for e in dots]
  # No matmul mixes a float32 and a bf16 operand (XLA would run it as a float32 one).
  assert all(len(d) == 1 for d in operands), [d for d in operands if len(d) > 1]
  f32_dots = [e for e, d in zip(dots, operands) if d == {F32}]
  # Every tower, fusion, LongNet and head matmul is bf16, forward and backward; float32
  # only for the [B, d] features against features or prototypes (ITC, L_z, V_T and V_I).
  assert sum(d == {BF16} for d in operands) > 10 * len(f32_dots)
  for e in f32_dots:
    shapes = [v.aval.shape for v in e.invars]
    assert all(len(s) == 2 for s in shapes), shapes
    assert any(config.model.embed_dim in s for s in shapes), shapes
  # The MLM decoder's [B, L, V] logits are accumulated and returned in float32 (a bf16
  # rounding of the softmax's input would cost ~3 significant digits).
  vocab_size = padded_vocab_size(config.data.vocab_size)
  length = config.data.max_text_len
  forward = all_eqns(jax.make_jaxpr(fn)(params).jaxpr)
  decoder = [e for e in forward if e.primitive.name == "dot_general"
             and e.outvars[0].aval.shape[1:] == (length, vocab_size)
             and e.invars[1].aval.shape == (config.model.text.width, vocab_size)]
  assert decoder and all(e.outvars[0].aval.dtype == F32 for e in decoder), decoder
  # Softmax / log-softmax statistics and LayerNorm are float32.
  for name in ("reduce_max", "log", "rsqrt"):
    dtypes = {e.invars[0].aval.dtype for e in eqns if e.primitive.name == name}
    assert dtypes == {F32}, (name, dtypes)
  # Gradients come out in the params' float32.
  assert {v.aval.dtype for v in jaxpr.outvars} == {F32}


def _train_step(config):
  """One compiled train step (1 device) from the init -> (init params, new state, metrics)."""
  mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = rules_from_config(config)
  model = build_model(config, config.data.vocab_size)
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  shapes, shardings = abstract_state(model, tx, config, mesh, rules)
  state = init_state(model, tx, config, shardings)
  params = jax.device_get(state.params)   # before the step donates the state
  step = compile_train_step(model, tx, schedule, config, vocab(config), mesh, rules, shapes,
                            shardings)
  state, metrics = step(state, random_batch(config))
  return params, state, jax.device_get(metrics)


def test_bfloat16_step_keeps_float32_state_and_the_float32_loss(tmp_path):
  ref_params, _, ref = _train_step(micro_config(tmp_path))
  params, state, got = _train_step(micro_config(tmp_path, dtype="bfloat16"))
  # The init does not depend on the compute dtype; the step keeps params and Adam float32.
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  for tree in (state.params, state.opt_state):
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == F32 for x in floats)
  assert state.queue.dtype == F32
  # bf16 rounds to 8 bits of mantissa (2^-9 relative per op). Measured: every term and
  # the total (about 36) within 4e-4 of float32, the gradient norm within 1.5e-3.
  for key in ("itc", "itm", "mlm", "swap", "prompt", "noun_code"):
    np.testing.assert_allclose(got[key], ref[key], rtol=5e-3, err_msg=key)
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-3)
  np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=2e-2)
