"""`clusjax.load_pretrained(workdir)`: a trained model as plain functions.

    model = clusjax.load_pretrained("workdirs/tiny")
    img = model.encode_image(images)        # uint8 [B, H, W, 3] -> float32 [B, 256]
    txt = model.encode_text(["a small red circle on the left."])
    sim = img @ txt.T                       # cosine similarities
    p = model.itm_score(images, texts)      # match probability of (images[i], texts[i])

`clusjax.load_finetuned(workdir)`: a fine-tuned model (configs/vqa.py, nlvr2.py,
retrieval.py) with the same interface plus its task's:

    model.answer(images, ["what colour is the circle?", ...])   # VQA -> list[str]
    model.verify(left_images, right_images, statements)         # NLVR2 -> float32 [B], P(true)
    model.caption(images, beam_size=3)                           # captioning -> list[str]
"""
import functools

import jax
import numpy as np
from jax.experimental import multihost_utils

from clusjax.data import Tokenizer
from clusjax.data.tasks import answer_vocab
from clusjax.losses import clip_temperature
from clusjax.models.clus import ClusModel
from clusjax.parallel.mesh import create_mesh
from clusjax.train.restore import restore_model
from clusjax.train.objective import TextIds


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
               batch_size=None, answers=None):
    self.model = model
    self.params = params
    self.active = np.asarray(active, bool)   # [K_max]: the prototypes that are clusters
    self.tokenizer = tokenizer
    self.config = config
    self.batch_size = batch_size or config.eval.batch_size
    self._image_fn = jax.jit(functools.partial(model.apply, method=ClusModel.encode_image))
    self._text_fn = jax.jit(functools.partial(model.apply, method=ClusModel.encode_text))
    self._itm_fn = jax.jit(functools.partial(model.apply, method=ClusModel.itm_logits))
    self._classify_fn = jax.jit(functools.partial(model.apply, method=ClusModel.classify))
    self.answers = answers   # VQA: the AnswerVocab (the head's classes), else None
    self._caption_fns = {}   # (beam_size, max_len) -> compiled decoder

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

  def _check_images(self, images, name="images"):
    images = np.asarray(images)
    size = self.config.data.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(
          f"expected {name} uint8 [B, {size}, {size}, 3], got {images.dtype} {images.shape}.")
    return images

  def _tokenize(self, texts, name="texts"):
    if isinstance(texts, str):
      raise TypeError(f"expected {name} as a list of strings, got one string.")
    return self.tokenizer.encode(list(texts), self.config.data.max_text_len)

  def _check_texts(self, texts, name, n):
    """texts: n non-empty strings (a one-line error naming `name` otherwise)."""
    if isinstance(texts, str) or not hasattr(texts, "__len__"):
      raise TypeError(f"expected {name} as a list of {n} strings, got {type(texts).__name__}.")
    if len(texts) != n:
      raise ValueError(f"{name} has {len(texts)} entries for {n} images.")
    for i, t in enumerate(texts):
      if not isinstance(t, str) or not t.strip():
        raise ValueError(f"{name}[{i}]={t!r} must be a non-empty string.")
    return list(texts)

  def _require_task(self, task, method):
    have = self.config.get("task", "pretrain")
    if have != task:
      raise ValueError(f"{method}() needs a model fine-tuned for {task} (configs/{task}.py); "
                       f"this one's config.task is {have!r}.")

  def task_logits(self, images, texts, images2=None):
    """The task head's logits float32 [B, C] for (images[i], texts[i]) (NLVR2: with
    images2[i], the right image); texts are questions (VQA) or statements (NLVR2)."""
    images = self._check_images(images)
    texts = self._check_texts(texts, "texts", len(images))
    arrays = [images, *self._tokenize(texts)]
    if images2 is not None:
      images2 = self._check_images(images2, "images2")
      if len(images2) != len(images):
        raise ValueError(f"images2 has {len(images2)} images for {len(images)} images.")
      arrays.append(images2)
    if not len(images):
      return np.zeros((0, self.model.num_classes), np.float32)
    return self._chunked(self._classify_fn, arrays)

  def answer(self, images, questions):
    """VQA: uint8 [B, H, W, 3] images and B questions -> B answers (list[str])."""
    self._require_task("vqa", "answer")
    images = self._check_images(images)
    questions = self._check_texts(questions, "questions", len(images))
    logits = self.task_logits(images, questions)[:, :len(self.answers)]
    return [self.answers.answers[i] for i in np.argmax(logits, axis=-1)]

  def verify(self, left_images, right_images, statements):
    """NLVR2: the probability that statements[i] is true of (left_images[i],
    right_images[i]) -> float32 [B]."""
    self._require_task("nlvr2", "verify")
    left = self._check_images(left_images, "left_images")
    right = self._check_images(right_images, "right_images")
    if len(left) != len(right):
      raise ValueError(f"right_images has {len(right)} images for {len(left)} left_images.")
    statements = self._check_texts(statements, "statements", len(left))
    logits = self.task_logits(left, statements, right)
    return np.asarray(jax.nn.softmax(logits, axis=-1)[:, 1], np.float32)

  def caption(self, images, *, beam_size=3, max_len=None):
    """Captioning (configs/caption.py): uint8 [B, H, W, 3] images -> B captions (list[str]).

    Beam search with `beam_size` beams (1: greedy) and config.caption.length_penalty,
    at most `max_len` tokens (None: config.caption.max_len; 0 there: as many as the
    text positions allow, config.data.max_text_len - 1). One compiled decoder per
    (beam_size, max_len), run in chunks of `batch_size` images.
    """
    self._require_task("caption", "caption")
    images = self._check_images(images)
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
      raise ValueError(f"beam_size={beam_size!r} must be an int >= 1.")
    limit = self.config.data.max_text_len - 1
    if max_len is None:
      max_len = self.config.caption.max_len or limit
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= limit:
      raise ValueError(f"max_len={max_len!r} must be an int in [1, {limit}] "
                       "(config.data.max_text_len - 1: [CLS] takes a position).")
    if not len(images):
      return []
    key = (beam_size, max_len)
    if key not in self._caption_fns:
      from clusjax.models.decode import caption_decoder
      self._caption_fns[key] = jax.jit(caption_decoder(
          self.model, TextIds.of(self.tokenizer), max_len=max_len,
          method="beam" if beam_size > 1 else "greedy", beam_size=beam_size,
          length_penalty=self.config.caption.length_penalty,
          mask_query=self.config.caption.decode_query == "mask"))
    fn = self._caption_fns[key]
    tokens, _ = self._chunked(lambda variables, chunk: fn(variables["params"], chunk), [images])
    return self.tokenizer.decode(tokens)

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
  answers = answer_vocab(config, workdir) if config.get("task") == "vqa" else None
  return Pretrained(model, params, tokenizer, config, active, answers=answers)


def load_finetuned(workdir, step=None, mesh=None):
  """`load_pretrained` of a fine-tuning workdir (config.task retrieval, vqa, nlvr2 or
  caption): `answer` (VQA), `verify` (NLVR2), `caption` and the retrieval interface."""
  from clusjax import workdir as wd
  task = wd.load_config(workdir).get("task", "pretrain")
  if task == "pretrain":
    raise ValueError(f"{workdir!r} is a pre-training workdir (config.task='pretrain'): load it "
                     "with clusjax.load_pretrained, or fine-tune it with configs/<task>.py "
                     f"--config.init_from={workdir}.")
  return load_pretrained(workdir, step=step, mesh=mesh)
