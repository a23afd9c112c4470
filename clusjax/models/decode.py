"""Autoregressive decoding: greedy, beam search and top-k / nucleus sampling.

Each search is a pure function of (step_fn, state, ...) driven by one
`lax.while_loop` (flax examples/wmt/decode.py style): sequences, scores,
finished flags and the decoding state are the loop's carry, and stopping
early (every row past [SEP]; for beam search, no live beam able to beat the
finished ones) is the loop's condition. It compiles once per shape under
`jax.jit` and runs on a batch sharded over a mesh (every op is per row, the
stop test a global `all`).

    step_fn(seqs int32 [N, L], s, state) -> (logits [N, V] float32, state)

reads token s of each row (and, uncached, the ones before it) and gives the
logits of token s + 1. `state` is any pytree with a leading batch axis
(beam search gathers its rows when beams are re-ordered).

Captioning (`caption_decoder`) builds step_fn from ClusModel: the image side
(ViT tokens and each fusion layer's cross-attention keys/values) is computed
once; each step runs the new token(s) through the text tower and the fusion
text stream with a per-layer self-attention key/value cache
(`ClusModel.caption_step`, dynamic_update_slice at the step's position). The
same module runs the full forward for training (`caption_logits`), and
`use_cache=False` decodes with it (the whole prefix every step), which must
give the same captions.
"""
import jax
import jax.numpy as jnp

from clusjax.models.clus import ClusModel, empty_caption_cache

NEG = -1e9   # log-probability of what cannot happen (finite: no inf - inf)


def _allowed(logits, allowed):
  return logits if allowed is None else jnp.where(allowed[None, :], logits, NEG)


def _sampling_loop(step_fn, state, batch, *, max_len, bos_id, eos_id, pad_id, pick,
                   allowed=None):
  """Greedy / sampling: (tokens int32 [B, max_len] (pad after [SEP]), sum of log p [B])."""
  seqs = jnp.full((batch, max_len + 1), pad_id, jnp.int32).at[:, 0].set(bos_id)

  def cond(carry):
    s, _, done, _, _ = carry
    return (s < max_len) & ~jnp.all(done)

  def body(carry):
    s, seqs, done, state, score = carry
    logits, state = step_fn(seqs, s, state)
    log_p = jax.nn.log_softmax(_allowed(logits.astype(jnp.float32), allowed), axis=-1)
    tok = pick(log_p, s)
    tok_lp = jnp.take_along_axis(log_p, tok[:, None], axis=1)[:, 0]
    tok = jnp.where(done, pad_id, tok)
    seqs = jax.lax.dynamic_update_slice(seqs, tok[:, None], (0, s + 1))
    score = score + jnp.where(done, 0.0, tok_lp)
    return s + 1, seqs, done | (tok == eos_id), state, score

  carry = (jnp.int32(0), seqs, jnp.zeros((batch,), bool), state, jnp.zeros((batch,), jnp.float32))
  _, seqs, _, _, score = jax.lax.while_loop(cond, body, carry)
  return seqs[:, 1:], score


def greedy_search(step_fn, state, batch, *, max_len, bos_id, eos_id, pad_id, allowed=None):
  """The most likely token at every step until [SEP] (eos_id) or max_len tokens.

  Returns (tokens int32 [B, max_len], pad after [SEP]; their log-probability [B])."""
  return _sampling_loop(step_fn, state, batch, max_len=max_len, bos_id=bos_id, eos_id=eos_id,
                        pad_id=pad_id, allowed=allowed,
                        pick=lambda log_p, s: jnp.argmax(log_p, axis=-1).astype(jnp.int32))


def filter_logits(logits, *, top_k=0, top_p=1.0):
  """Top-k (k > 0) then nucleus (top_p < 1: the fewest most likely tokens whose
  probability reaches top_p) filtering: the rest get NEG. logits [B, V]."""
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, NEG, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs   # mass of the more likely tokens
    keep = before < top_p                          # always keeps the first
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG, logits)
  return logits


def sample(step_fn, state, batch, rng, *, max_len, bos_id, eos_id, pad_id, temperature=1.0,
           top_k=0, top_p=1.0, allowed=None):
  """Ancestral sampling from softmax(logits / temperature), top-k / nucleus
  filtered; step s draws with fold_in(rng, s), so a seed gives one output.

  Returns (tokens int32 [B, max_len], their log-probability under the model [B])."""
  if temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0 (greedy_search is temperature 0).")

  def pick(log_p, s):
    logits = filter_logits(log_p / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(jax.random.fold_in(rng, s), logits, axis=-1).astype(jnp.int32)
  return _sampling_loop(step_fn, state, batch, max_len=max_len, bos_id=bos_id, eos_id=eos_id,
                        pad_id=pad_id, allowed=allowed, pick=pick)


def length_normalizer(length, alpha):
  """GNMT's length penalty ((5 + length) / 6) ** alpha; alpha 0: none."""
  return ((5.0 + length) / 6.0) ** alpha


def beam_search(step_fn, state, batch, *, beam_size, max_len, bos_id, eos_id, pad_id,
                length_penalty=0.0, allowed=None):
  """Beam search; `state` has batch rows (repeated beam_size times inside).

  Each step expands the live beams and keeps the beam_size best continuations
  (by summed log-probability); those that end in [SEP] leave the beam and join
  the row's finished list (score: log p / length_normalizer(length,
  length_penalty)). The loop stops at max_len, or when in every row all
  beam_size finished slots are filled and no live beam, even with the best
  possible normaliser, can beat the worst of them (or none is live). With
  beam_size 1 it is greedy search.

  Returns (tokens int32 [B, max_len] of each row's best finished (else live)
  beam, pad after [SEP]; its score [B]).
  """
  k, length = beam_size, max_len + 1
  seqs = jnp.full((batch, k, length), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
  alive_lp = jnp.tile(jnp.asarray([0.0] + [NEG] * (k - 1), jnp.float32), (batch, 1))
  state = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), state)
  fin_seqs = seqs
  fin_score = jnp.full((batch, k), NEG, jnp.float32)
  best_norm = length_normalizer(max_len, length_penalty)

  def cond(carry):
    s, _, alive_lp, _, fin_score, _ = carry
    # Live log p only falls; with alpha >= 0 the normaliser only grows to best_norm.
    bound = jnp.max(alive_lp, axis=1) / best_norm
    full = jnp.all(fin_score > NEG / 2, axis=1)
    done = (full & (jnp.min(fin_score, axis=1) >= bound)) | jnp.all(alive_lp <= NEG / 2, axis=1)
    return (s < max_len) & ~jnp.all(done)

  def body(carry):
    s, seqs, alive_lp, fin_seqs, fin_score, state = carry
    logits, state = step_fn(seqs.reshape(batch * k, length), s, state)
    log_p = jax.nn.log_softmax(_allowed(logits.astype(jnp.float32), allowed), axis=-1)
    vocab = log_p.shape[-1]
    candidates = (alive_lp[:, :, None] + log_p.reshape(batch, k, vocab)).reshape(batch, k * vocab)
    top_lp, top = jax.lax.top_k(candidates, k)                        # [B, K]
    beam, tok = top // vocab, (top % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(seqs, beam[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, s + 1))
    rows = (jnp.arange(batch)[:, None] * k + beam).reshape(-1)
    state = jax.tree.map(lambda x: x[rows], state)
    ended = (tok == eos_id) & (top_lp > NEG / 2)
    # Finished: the old list and the beams that just ended, best k kept.
    new_score = jnp.where(ended, top_lp / length_normalizer(s + 1.0, length_penalty), NEG)
    all_score = jnp.concatenate([fin_score, new_score], axis=1)
    fin_score, keep = jax.lax.top_k(all_score, k)
    fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, seqs], axis=1),
                                   keep[:, :, None], axis=1)
    alive_lp = jnp.where(ended, NEG, top_lp)
    return s + 1, seqs, alive_lp, fin_seqs, fin_score, state

  carry = (jnp.int32(0), seqs, alive_lp, fin_seqs, fin_score, state)
  _, seqs, alive_lp, fin_seqs, fin_score, _ = jax.lax.while_loop(cond, body, carry)
  # A row with no finished beam (max_len reached first) gives its best live one.
  any_fin = fin_score[:, 0] > NEG / 2
  live = jnp.argmax(alive_lp, axis=1)
  live_seq = jnp.take_along_axis(seqs, live[:, None, None], axis=1)[:, 0]
  live_score = jnp.max(alive_lp, axis=1) / best_norm
  out = jnp.where(any_fin[:, None], fin_seqs[:, 0], live_seq)
  return out[:, 1:], jnp.where(any_fin, fin_score[:, 0], live_score)


def caption_decoder(model: ClusModel, text_ids, *, max_len, method="beam", beam_size=3,
                    length_penalty=0.0, temperature=1.0, top_k=0, top_p=1.0,
                    mask_query=True, use_cache=True):
  """A function `(params, images uint8 [B, H, W, 3], rng) -> (tokens int32 [B, max_len],
  scores [B])` to `jax.jit`, decoding captions with `model`.

  text_ids: the tokenizer's ids (clusjax.train.objective.TextIds). method: greedy |
  beam | sample. mask_query: step s feeds (token s, [MASK]) at positions
  (s, s + 1) and reads the [MASK]'s logits (UniLM's decoding, for a model
  fine-tuned with masked-token prediction); False feeds token s alone and reads
  its own (next-token LM). The cache holds max_len + 1 positions ([CLS] and the
  tokens), within the text tower's position table (config.data.max_text_len).
  """
  if method not in ("greedy", "beam", "sample"):
    raise ValueError(f"method={method!r} must be greedy, beam or sample.")
  if max_len + 1 > model.max_text_len:
    raise ValueError(f"max_len={max_len} needs {max_len + 1} text positions; the model has "
                     f"{model.max_text_len} (config.data.max_text_len): use max_len <= "
                     f"{model.max_text_len - 1}.")
  length = max_len + 1
  mask_id, n_new = text_ids.mask_id, 1 + int(mask_query)
  # Never generated: padding (id 0 in both tokenizers), [CLS], [MASK], the padded vocabulary.
  allowed = jnp.arange(model.vocab_size) < text_ids.vocab_size
  for i in (text_ids.cls_id, text_ids.mask_id, 0):
    allowed = allowed.at[i].set(False)

  def queries(seqs, s):
    tok = jax.lax.dynamic_slice_in_dim(seqs, s, 1, axis=1)
    if mask_query:
      tok = jnp.concatenate([tok, jnp.full_like(tok, mask_id)], axis=1)
    return tok

  def decode(params, images, rng=None):
    variables = {"params": params}
    image_tokens, _ = model.apply(variables, images, method=ClusModel.encode_image)
    b = images.shape[0]
    if use_cache:
      cache = empty_caption_cache(model.config, b, length, model.dtype)
      first = jnp.full((b, n_new), mask_id, jnp.int32).at[:, 0].set(text_ids.cls_id)
      # The first call fills each fusion layer's cross-attention keys/values of the
      # image (its self-attention slots are rewritten by step 0 with the same values).
      _, cache = model.apply(variables, image_tokens, first, 0, cache,
                             method=ClusModel.caption_step)
      state = {"image": image_tokens, "cache": cache}

      def step_fn(seqs, s, state):
        logits, cache = model.apply(variables, state["image"], queries(seqs, s), s,
                                    state["cache"], method=ClusModel.caption_step)
        return logits[:, -1], {**state, "cache": cache}
    else:
      state = {"image": image_tokens}

      def step_fn(seqs, s, state):
        ids = seqs
        if mask_query:
          ids = jnp.where(jnp.arange(length)[None, :] == s + 1, mask_id, seqs)
        logits = model.apply(variables, state["image"], ids, jnp.ones_like(ids, bool),
                             method=ClusModel.caption_logits)
        return jax.lax.dynamic_index_in_dim(logits, s + n_new - 1, axis=1,
                                            keepdims=False), state

    kw = dict(max_len=max_len, bos_id=text_ids.cls_id, eos_id=text_ids.sep_id, pad_id=0,
              allowed=allowed)
    if method == "greedy":
      return greedy_search(step_fn, state, b, **kw)
    if method == "beam":
      return beam_search(step_fn, state, b, beam_size=beam_size,
                         length_penalty=length_penalty, **kw)
    return sample(step_fn, state, b, rng, temperature=temperature, top_k=top_k, top_p=top_p,
                  **kw)

  return decode
