"""Decoding (clusjax/models/decode.py): the searches against numpy references on a toy
Markov model, and captioning with ClusModel: cache = no cache = the full forward's
argmax, beam 1 = greedy, a batch sharded over 8 devices = one device."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clusjax.models.clus import ClusModel, build_model, empty_caption_cache
from clusjax.models.decode import (beam_search, caption_decoder, filter_logits, greedy_search,
                                   length_normalizer, sample)
from clusjax.parallel.mesh import create_mesh
from clusjax.train.objective import TextIds
from tests.conftest import micro_config

PAD, BOS, EOS = 0, 1, 2


def _toy(table):
  """step_fn of a Markov model: logits of token s + 1 = table[row, token s] ([B, V, V])."""
  table = jnp.asarray(table, jnp.float32)

  def step_fn(seqs, s, state):
    prev = jax.lax.dynamic_index_in_dim(seqs, s, axis=1, keepdims=False)
    return table[state["row"], prev], state
  return step_fn


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _allowed(v):
  return jnp.arange(v) >= 2   # PAD and BOS never generated


def _numpy_greedy(table, max_len):
  out = []
  for row in table:
    tok, seq = BOS, []
    for _ in range(max_len):
      lp = _log_softmax(np.where(np.arange(row.shape[1]) >= 2, row[tok], -1e9))
      tok = int(np.argmax(lp))
      seq.append(tok)
      if tok == EOS:
        break
    out.append(seq + [PAD] * (max_len - len(seq)))
  return np.asarray(out)


def test_greedy_matches_numpy_and_rows_end_apart():
  rng = np.random.default_rng(0)
  v, max_len = 6, 7
  table = rng.normal(size=(3, v, v)) * 3
  table[0, BOS, EOS] = 50            # row 0 ends at once
  table[1, :, EOS] = -50             # row 1 never ends
  state = {"row": jnp.arange(3)}
  tokens, _ = jax.jit(lambda: greedy_search(_toy(table), state, 3, max_len=max_len, bos_id=BOS,
                                            eos_id=EOS, pad_id=PAD, allowed=_allowed(v)))()
  np.testing.assert_array_equal(tokens, _numpy_greedy(table, max_len))
  assert tokens[0, 0] == EOS and np.all(tokens[0, 1:] == PAD)
  assert EOS not in np.asarray(tokens[1])


def _exhaustive_best(row_table, max_len, alpha):
  """The best [SEP]-ended sequence by log p / length_normalizer, by enumeration."""
  v = row_table.shape[0]
  best, best_seq = -np.inf, None
  for n in range(1, max_len + 1):
    for words in itertools.product(range(3, v), repeat=n - 1):
      seq, lp, prev = list(words) + [EOS], 0.0, BOS
      for tok in seq:
        lp += _log_softmax(np.where(np.arange(v) >= 2, row_table[prev], -1e9))[tok]
        prev = tok
      score = lp / length_normalizer(n, alpha)
      if score > best:
        best, best_seq = score, seq
  return best, best_seq + [PAD] * (max_len - len(best_seq))


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_is_exhaustive_search(alpha):
  """With a beam wider than every candidate set, beam search (early stop included)
  finds the best finished sequence of an exhaustive search."""
  rng = np.random.default_rng(1)
  v, max_len = 5, 4                  # words 3, 4: 15 [SEP]-ended sequences
  table = rng.normal(size=(4, v, v)) * 2
  state = {"row": jnp.arange(4)}
  tokens, scores = jax.jit(lambda: beam_search(
      _toy(table), state, 4, beam_size=32, max_len=max_len, bos_id=BOS, eos_id=EOS,
      pad_id=PAD, length_penalty=alpha, allowed=_allowed(v)))()
  for r in range(4):
    best, seq = _exhaustive_best(table[r], max_len, alpha)
    np.testing.assert_array_equal(tokens[r], seq)
    np.testing.assert_allclose(scores[r], best, rtol=1e-5)


def test_beam_one_is_greedy_and_sampling_is_seeded():
  rng = np.random.default_rng(2)
  v, max_len, b = 8, 6, 5
  table = rng.normal(size=(b, v, v)) * 2
  state = {"row": jnp.arange(b)}
  kw = dict(max_len=max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD, allowed=_allowed(v))
  greedy, g_score = greedy_search(_toy(table), state, b, **kw)
  beam, b_score = beam_search(_toy(table), state, b, beam_size=1, **kw)
  np.testing.assert_array_equal(beam, greedy)
  np.testing.assert_allclose(b_score, g_score, rtol=1e-5)
  draw = jax.jit(lambda key, k, p: sample(_toy(table), state, b, key, top_k=k, top_p=p, **kw),
                 static_argnums=(1, 2))
  a1, a2 = draw(jax.random.key(0), 0, 1.0), draw(jax.random.key(0), 0, 1.0)
  np.testing.assert_array_equal(a1[0], a2[0])
  assert not np.array_equal(a1[0], draw(jax.random.key(1), 0, 1.0)[0])
  np.testing.assert_array_equal(draw(jax.random.key(3), 1, 1.0)[0], greedy)     # top-1
  np.testing.assert_array_equal(draw(jax.random.key(4), 0, 1e-6)[0], greedy)    # nucleus ~0


def test_filter_logits_against_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 10)).astype(np.float32)
  out = np.asarray(filter_logits(jnp.asarray(logits), top_k=3))
  for row, o in zip(logits, out):
    keep = row >= np.sort(row)[-3]
    assert np.all(o[keep] == row[keep]) and np.all(o[~keep] < -1e8)
  out = np.asarray(filter_logits(jnp.asarray(logits), top_p=0.7))
  for row, o in zip(logits, out):
    order = np.argsort(-row)
    p = np.exp(row[order] - row.max())
    p /= p.sum()
    n = int(np.searchsorted(np.cumsum(p), 0.7) + 1)   # fewest tokens reaching 0.7
    kept = set(order[:n].tolist())
    assert {i for i in range(10) if o[i] > -1e8} == kept


# ---- captioning with ClusModel ----

TEXT_IDS = TextIds(cls_id=2, sep_id=3, mask_id=4, vocab_size=90, first_random_id=5)


@pytest.fixture(scope="module")
def caption_model(tmp_path_factory):
  """A micro ClusModel (random init) made to depend on the image (its cross-attention
  output scaled up) with sharper logits and a [SEP] bias at which captions of different
  images end at different steps."""
  config = micro_config(tmp_path_factory.mktemp("unused"))
  model = build_model(config, TEXT_IDS.vocab_size)
  ids = jnp.zeros((1, config.data.max_text_len), jnp.int32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), ids,
                      jnp.ones_like(ids, bool))["params"]
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  head = params["mlm_decoder"]
  params["mlm_decoder"] = {"kernel": head["kernel"] * 10,
                           "bias": head["bias"].at[TEXT_IDS.sep_id].set(-0.5)}
  cross = params["fusion"]["text_block_0"]["cross_attn"]["out"]
  cross["kernel"] = cross["kernel"] * 30
  images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  images[::2] //= 8
  return model, params, images


def test_caption_step_equals_full_forward(caption_model):
  """Teacher-forced: each cached step's logits = caption_logits at that position."""
  model, params, images = caption_model
  v = {"params": params}
  ids = jnp.asarray(np.random.default_rng(1).integers(5, 90, (3, 10)), jnp.int32)
  image_tokens, _ = model.apply(v, images[:3], method=ClusModel.encode_image)
  full = model.apply(v, image_tokens, ids, jnp.ones_like(ids, bool),
                     method=ClusModel.caption_logits)
  step = jax.jit(lambda ids, s, cache: model.apply(v, image_tokens, ids, s, cache,
                                                   method=ClusModel.caption_step))
  cache = empty_caption_cache(model.config, 3, 10)
  for s in range(10):
    logits, cache = step(ids[:, s:s + 1], s, cache)
    np.testing.assert_allclose(logits[:, 0], full[:, s], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_query", [True, False])
def test_greedy_cache_no_cache_and_full_argmax(caption_model, mask_query):
  model, params, images = caption_model
  max_len = 12
  kw = dict(max_len=max_len, method="greedy", mask_query=mask_query)
  cached, _ = jax.jit(caption_decoder(model, TEXT_IDS, **kw))(params, images[:8])
  uncached, _ = jax.jit(caption_decoder(model, TEXT_IDS, use_cache=False, **kw))(params,
                                                                               images[:8])
  np.testing.assert_array_equal(cached, uncached)
  lengths = [(list(r) + [TEXT_IDS.sep_id]).index(TEXT_IDS.sep_id) for r in np.asarray(cached)]
  if mask_query:   # (the fixture's [SEP] bias is tuned for this query)
    assert len(set(lengths)) > 1, lengths    # rows end at different steps
  # Every token is the argmax (over the allowed ids) of a full forward of its prefix.
  v = {"params": params}
  image_tokens, _ = model.apply(v, images[:8], method=ClusModel.encode_image)
  full = jax.jit(lambda ids: model.apply(v, image_tokens, ids, jnp.ones(ids.shape, bool),
                                         method=ClusModel.caption_logits))
  seqs = np.concatenate([np.full((8, 1), TEXT_IDS.cls_id), np.asarray(cached)], axis=1)
  for s in range(max_len):
    # The prefix (+ [MASK]) padded to one length: the causal mask hides what follows.
    ids = np.zeros((8, max_len + 1), np.int32)
    ids[:, :s + 1] = seqs[:, :s + 1]
    if mask_query:
      ids[:, s + 1] = TEXT_IDS.mask_id
    read = s + 1 if mask_query else s
    logits = np.array(full(jnp.asarray(ids))[:, read, :TEXT_IDS.vocab_size])
    logits[:, [0, TEXT_IDS.cls_id, TEXT_IDS.mask_id]] = -np.inf
    live = np.asarray([TEXT_IDS.sep_id not in seqs[r, 1:s + 1] for r in range(8)])
    np.testing.assert_array_equal(np.argmax(logits, -1)[live], seqs[live, s + 1])


@pytest.mark.parametrize("mask_query", [True, False])
def test_beam_cache_no_cache_and_beam_one_is_greedy(caption_model, mask_query):
  model, params, images = caption_model
  beam = [jax.jit(caption_decoder(model, TEXT_IDS, max_len=10, method="beam", beam_size=3,
                                  length_penalty=0.6, use_cache=c,
                                  mask_query=mask_query))(params, images[:4])
          for c in (True, False)]
  np.testing.assert_array_equal(beam[0][0], beam[1][0])
  np.testing.assert_allclose(beam[0][1], beam[1][1], rtol=1e-5)
  one, _ = jax.jit(caption_decoder(model, TEXT_IDS, max_len=10, method="beam", beam_size=1,
                                   mask_query=mask_query))(params, images[:4])
  greedy, _ = jax.jit(caption_decoder(model, TEXT_IDS, max_len=10, method="greedy",
                                      mask_query=mask_query))(params, images[:4])
  np.testing.assert_array_equal(one, greedy)


@pytest.mark.parametrize("mask_query", [True, False])
def test_sharded_batch_gives_the_one_device_captions(caption_model, mask_query):
  """A batch of 64 split over 8 (fake CPU) devices decodes to the 1-device captions."""
  model, params, images = caption_model
  assert jax.device_count() == 8
  fn = jax.jit(caption_decoder(model, TEXT_IDS, max_len=10, method="beam", beam_size=2,
                               mask_query=mask_query))
  one, _ = fn(params, images)
  mesh = create_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  many, _ = fn(replicated, sharded)
  assert len(many.sharding.device_set) == 8
  np.testing.assert_array_equal(many, one)
