"""`clusjax.load_pretrained(workdir)`: a trained model as plain functions.

    model = clusjax.load_pretrained("workdirs/tiny")
    img = model.encode_image(images)        # uint8 [B, H, W, 3] -> float32 [B, 256]
    txt = model.encode_text(["a small red circle on the left."])
    sim = img @ txt.T                       # cosine similarities
    p = model.itm_score(images, texts)      # match probability of (images[i], texts[i])
"""
import functools

import jax
import numpy as np
from jax.experimental import multihost_utils

from clusjax.data import Tokenizer
from clusjax.losses import clip_temperature
from clusjax.models.clus import ClusModel
from clusjax.parallel.mesh import create_mesh
from clusjax.train.restore import restore_model


def _to_numpy(x):
  """A jax.Array as numpy; one that spans other processes' devices (params on
  a multi-host mesh) is gathered, a collective every process must call."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)


class Pretrained:
  """A Clus model with its params, tokenizer and config.

  Inputs are batched internally in chunks of `batch_size` (the last chunk
  padded), so any number of examples runs on one compiled shape. `active`
  (bool [K_max], from the checkpoint) says which prototype columns are
  clusters: LongNet's cluster tokens in ITM read only those.
  """

  def __init__(self, model: ClusModel, params, tokenizer: Tokenizer, config, active,
               batch_size=None):
    self.model = model
    self.params = params
    self.active = np.asarray(active, bool)   # [K_max]: the prototypes that are clusters
    self.tokenizer = tokenizer
    self.config = config
    self.batch_size = batch_size or config.eval.batch_size
    self._image_fn = jax.jit(functools.partial(model.apply, method=ClusModel.encode_image))
    self._text_fn = jax.jit(functools.partial(model.apply, method=ClusModel.encode_text))
    self._itm_fn = jax.jit(functools.partial(model.apply, method=ClusModel.itm_logits))

  @property
  def logit_scale(self):
    """What the trained contrastive loss multiplies cosine similarity by:
    1 / temperature (InfoNCE), or exp(log temperature) under SigLIP."""
    if "siglip_log_temperature" in self.params:
      return float(np.exp(self.params["siglip_log_temperature"]))
    return float(1.0 / clip_temperature(self.params["temperature"]))

  def _chunked(self, fn, arrays):
    """Applies fn to chunks of the arrays; returns its outputs concatenated (numpy)."""
    n = len(arrays[0])
    out = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start:start + self.batch_size] for a in arrays]
      real = len(chunk[0])
      pad = self.batch_size - real
      if pad:
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
      result = fn({"params": self.params}, *chunk)
      out.append(jax.tree.map(lambda x: _to_numpy(x)[:real], result))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *out)

  def _check_images(self, images):
    images = np.asarray(images)
    size = self.config.data.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(
          f"expected images uint8 [B, {size}, {size}, 3], got {images.dtype} {images.shape}.")
    return images

  def _tokenize(self, texts):
    if isinstance(texts, str):
      raise TypeError("expected a list of strings, got one string.")
    return self.tokenizer.encode(list(texts), self.config.data.max_text_len)

  def image_outputs(self, images):
    """uint8 [B, H, W, 3] -> (tokens float32 [B, 1+N, Wv], features float32 [B, E])."""
    images = self._check_images(images)
    if not len(images):
      return (np.zeros((0, 0, self.config.model.vision.width), np.float32),
              np.zeros((0, self.config.model.embed_dim), np.float32))
    return self._chunked(self._image_fn, [images])

  def text_outputs(self, texts):
    """list of str -> (tokens float32 [B, L, Wt], mask bool [B, L], features [B, E])."""
    ids, mask = self._tokenize(texts)
    if not len(ids):
      return (np.zeros((0, ids.shape[1], self.config.model.text.width), np.float32), mask,
              np.zeros((0, self.config.model.embed_dim), np.float32))
    tokens, feats = self._chunked(self._text_fn, [ids, mask])
    return tokens, mask, feats

  def encode_image(self, images):
    """uint8 [B, H, W, 3] (H = W = config.data.image_size) -> float32 [B, E], unit norm."""
    return self.image_outputs(images)[1]

  def encode_text(self, texts):
    """list of str -> float32 [B, E], unit norm."""
    return self.text_outputs(texts)[2]

  def itm_logits(self, image_tokens, text_tokens, text_mask, image_feats, text_feats):
    """Fused match logits (no match, match) [B, 2] of pair i = (image i, text i),
    from `image_outputs` / `text_outputs` of the images and texts."""
    if len(image_tokens) != len(text_tokens):
      raise ValueError(f"itm needs as many images ({len(image_tokens)}) as texts "
                       f"({len(text_tokens)}): pair i is (image i, text i).")
    if not len(image_tokens):
      return np.zeros((0, 2), np.float32)
    fn = lambda variables, *pair: self._itm_fn(variables, *pair, self.active)  # noqa: E731
    return self._chunked(fn, [image_tokens, text_tokens, text_mask, image_feats, text_feats])

  def itm_score(self, images, texts):
    """Match probability of each pair (images[i], texts[i]) -> float32 [B] in [0, 1]."""
    image_tokens, image_feats = self.image_outputs(images)
    text_tokens, mask, text_feats = self.text_outputs(texts)
    logits = self.itm_logits(image_tokens, text_tokens, mask, image_feats, text_feats)
    return np.asarray(jax.nn.softmax(logits, axis=-1)[:, 1], np.float32)


def load_pretrained(workdir, step=None, mesh=None):
  """Loads the latest (or `step`) checkpoint of a training workdir on one device,
  or on `mesh` (a multi-host job passes the mesh over all processes' devices,
  and every process then calls the model's methods with the same inputs)."""
  if mesh is None:
    mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model, params, active, config, tokenizer = restore_model(workdir, mesh, step=step)
  return Pretrained(model, params, tokenizer, config, active)
