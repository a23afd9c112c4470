"""A trained workdir back in memory: its tokenizer, model and params.

`clusjax.load_pretrained` restores on one device; a distillation teacher
(`config.distill.teacher`) restores into the student's mesh.
"""
import hashlib
import os

from clusjax import workdir as wd
from clusjax.data import Tokenizer
from clusjax.data.hf_tokenizer import HFTokenizer
from clusjax.models.clus import build_model
from clusjax.parallel.mesh import rules_from_config
from clusjax.train.checkpoint import Checkpointer
from clusjax.train.optimizer import make_optimizer
from clusjax.train.state import abstract_state


def load_tokenizer(workdir):
  """The tokenizer a workdir trained with: WordPiece files of model.text.init_from,
  or the SentencePiece model."""
  hf_dir = wd.path(workdir, wd.HF_TOKENIZER_DIR)
  if os.path.isdir(hf_dir):
    return HFTokenizer.from_pretrained(hf_dir)
  return Tokenizer.load(wd.path(workdir, wd.TOKENIZER_FILE))


def tokenizer_fingerprint(workdir):
  """A hash of the workdir's tokenizer files: equal fingerprints, equal token ids."""
  hf_dir = wd.path(workdir, wd.HF_TOKENIZER_DIR)
  if os.path.isdir(hf_dir):
    files = [os.path.join(hf_dir, f) for f in sorted(os.listdir(hf_dir))]
  else:
    files = [wd.path(workdir, wd.TOKENIZER_FILE)]
  digest = hashlib.sha256()
  for f in files:
    with open(f, "rb") as fh:
      digest.update(os.path.basename(f).encode() + b"\0" + fh.read())
  return digest.hexdigest()


def _print_main(message):
  import jax
  if jax.process_index() == 0:
    print(message, flush=True)


def restore_checkpoint(workdir, mesh, rules=None, step=None, log=_print_main):
  """(step, model, params, active, config, tokenizer) of checkpoint `step` of
  `workdir`, or of its newest readable one (an unreadable newer one is skipped
  with a warning); says which step it loaded through `log`."""
  config = wd.load_config(workdir)
  tokenizer = load_tokenizer(workdir)
  ckpt = Checkpointer(wd.path(workdir, wd.CHECKPOINT_DIR), read_only=True)

  def restore_at(s):
    config.clustering.max_prototypes = ckpt.k_max(s)   # K_max may grow during a run
    model = build_model(config, tokenizer.vocab_size)
    tx, _ = make_optimizer(config.optim, config.train.num_steps)
    shapes, _ = abstract_state(model, tx, config, mesh,
                               rules_from_config(config) if rules is None else rules)
    return model, ckpt.restore(shapes, step=s)

  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {wd.path(workdir, wd.CHECKPOINT_DIR)}")
    if step is None:
      step, (model, state) = ckpt.restore_newest(restore_at, log=log)
    else:
      model, state = restore_at(step)
  finally:
    ckpt.close()
  log(f"Loaded step {step} of {workdir}")
  return step, model, state.params, state.active, config, tokenizer


def restore_model(workdir, mesh, rules=None, step=None, log=_print_main):
  """(model, params, active, config, tokenizer) of the latest readable (or `step`)
  checkpoint in `workdir`, the params placed on `mesh` by `rules` (None: the
  workdir's own sharding rules); says which step it loaded through `log`."""
  return restore_checkpoint(workdir, mesh, rules, step, log)[1:]


def resample_pos_embed(pos_embed, num_tokens):
  """ViT position embeddings [1, 1 + n * n, W] -> [1, 1 + m * m, W] (num_tokens = 1 + m * m):
  the CLS row kept, the n x n grid resized bicubically (as BEiT / big_vision do when
  fine-tuning at another image size than pre-training)."""
  import jax
  import jax.numpy as jnp
  n, m = (int(round((t - 1) ** 0.5)) for t in (pos_embed.shape[1], num_tokens))
  if n * n + 1 != pos_embed.shape[1] or m * m + 1 != num_tokens:
    raise ValueError(f"position embeddings of {pos_embed.shape[1]} and {num_tokens} tokens are "
                     "not 1 + a square grid each.")
  width = pos_embed.shape[-1]
  grid = pos_embed[0, 1:].reshape(n, n, width).astype(jnp.float32)
  grid = jax.image.resize(grid, (m, m, width), method="bicubic")
  return jnp.concatenate([pos_embed[:, :1], grid.reshape(1, m * m, width).astype(pos_embed.dtype)],
                         axis=1)


def _name(path):
  return "/".join(path)


def load_init_from(state, source, mesh, rules, log=print):
  """`state` (freshly initialised) with the params of `source`'s latest checkpoint
  (config.init_from): every leaf `source` has at the same path is copied in, the
  ViT position embeddings resampled to this run's image size, `active` taken when
  K_max matches; the optimizer state stays as initialised (Adam's moments are
  zeros whatever the params). Says what it loaded and what is new.

  Raises ValueError naming a parameter whose shape differs in `source` (other
  than the position embeddings; `clusjax.config.check_init_from` catches the
  config keys behind such shapes before anything is built).
  """
  import jax
  from flax import traverse_util
  step, _, params, active, _, _ = restore_checkpoint(source, mesh, rules, log=log)
  theirs = traverse_util.flatten_dict(params)
  mine = traverse_util.flatten_dict(state.params)
  loaded, new, resampled, out = [], [], [], {}
  for path, leaf in mine.items():
    value = theirs.get(path)
    if value is None:
      new.append(_name(path))
      out[path] = leaf
      continue
    if value.shape != leaf.shape:
      if path[-1] != "pos_embed" or path[0] != "vision":
        raise ValueError(f"config.init_from={source!r}: parameter {_name(path)} is "
                         f"{tuple(value.shape)} there and {tuple(leaf.shape)} here.")
      resampled.append(f"{_name(path)} {tuple(value.shape)} -> {tuple(leaf.shape)}")
      value = jax.jit(resample_pos_embed, static_argnums=1,
                      out_shardings=leaf.sharding)(value, leaf.shape[1])
    loaded.append(leaf.size)
    out[path] = jax.device_put(value.astype(leaf.dtype), leaf.sharding)
  unused = [_name(p) for p in theirs if p not in mine]
  if active.shape == state.active.shape:
    state = state.replace(active=jax.device_put(active, state.active.sharding))
  log(f"init_from {source} (step {step}): loaded {len(loaded)} tensors "
      f"({sum(loaded) / 1e6:.2f}M params); new: {', '.join(sorted(new)) or 'none'}"
      + (f"; resampled {', '.join(resampled)}" if resampled else "")
      + (f"; not used: {', '.join(sorted(unused))}" if unused else ""))
  return state.replace(params=traverse_util.unflatten_dict(out))
