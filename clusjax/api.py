"""`clusjax.load_pretrained(workdir)`: a trained model as plain functions.

    model = clusjax.load_pretrained("workdirs/tiny")
    img = model.encode_image(images)        # uint8 [B, H, W, 3] -> float32 [B, 256]
    txt = model.encode_text(["a small red circle on the left."])
    sim = img @ txt.T                       # cosine similarities
"""
import functools

import jax
import numpy as np

from clusjax import workdir as wd
from clusjax.data import Tokenizer
from clusjax.models.clus import ClusModel, build_model
from clusjax.parallel.mesh import create_mesh, rules_from_config
from clusjax.train.checkpoint import Checkpointer
from clusjax.train.optimizer import make_optimizer
from clusjax.train.state import abstract_state


class Pretrained:
  """A Clus model with its params, tokenizer and config.

  Inputs are batched internally in chunks of `batch_size` (the last chunk
  padded), so any number of examples runs on one compiled shape.
  """

  def __init__(self, model: ClusModel, params, tokenizer: Tokenizer, config, batch_size=None):
    self.model = model
    self.params = params
    self.tokenizer = tokenizer
    self.config = config
    self.batch_size = batch_size or config.eval.batch_size
    self._image_fn = jax.jit(functools.partial(model.apply, method=ClusModel.encode_image))
    self._text_fn = jax.jit(functools.partial(model.apply, method=ClusModel.encode_text))

  def _chunked(self, fn, arrays, n):
    out = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start:start + self.batch_size] for a in arrays]
      real = len(chunk[0])
      pad = self.batch_size - real
      if pad:
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
      _, feats = fn({"params": self.params}, *chunk)
      out.append(np.asarray(feats)[:real])
    return np.concatenate(out) if out else np.zeros((0, self.config.model.embed_dim), np.float32)

  def encode_image(self, images):
    """uint8 [B, H, W, 3] (H = W = config.data.image_size) -> float32 [B, E], unit norm."""
    images = np.asarray(images)
    size = self.config.data.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(
          f"encode_image expects uint8 [B, {size}, {size}, 3], got {images.dtype} {images.shape}.")
    return self._chunked(self._image_fn, [images], len(images))

  def encode_text(self, texts):
    """list of str -> float32 [B, E], unit norm."""
    if isinstance(texts, str):
      raise TypeError("encode_text expects a list of strings, got one string.")
    ids, mask = self.tokenizer.encode(list(texts), self.config.data.max_text_len)
    return self._chunked(self._text_fn, [ids, mask], len(texts))


def load_pretrained(workdir, step=None):
  """Loads the latest (or `step`) checkpoint of a training workdir on one device."""
  config = wd.load_config(workdir)
  tokenizer = Tokenizer.load(wd.path(workdir, wd.TOKENIZER_FILE))
  model = build_model(config, tokenizer.vocab_size)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  shapes, _ = abstract_state(model, tx, config, mesh, rules_from_config(config))
  ckpt = Checkpointer(wd.path(workdir, wd.CHECKPOINT_DIR), read_only=True)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {wd.path(workdir, wd.CHECKPOINT_DIR)}")
  state = ckpt.restore(shapes, step=step)
  ckpt.close()
  return Pretrained(model, state.params, tokenizer, config)
