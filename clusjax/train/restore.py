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


def restore_model(workdir, mesh, rules=None, step=None):
  """(model, params, active, config, tokenizer) of the latest (or `step`)
  checkpoint in `workdir`, the params placed on `mesh` by `rules` (None: the
  workdir's own sharding rules)."""
  config = wd.load_config(workdir)
  tokenizer = load_tokenizer(workdir)
  ckpt = Checkpointer(wd.path(workdir, wd.CHECKPOINT_DIR), read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {wd.path(workdir, wd.CHECKPOINT_DIR)}")
    config.clustering.max_prototypes = ckpt.k_max(step)   # K_max may grow during a run
    model = build_model(config, tokenizer.vocab_size)
    tx, _ = make_optimizer(config.optim, config.train.num_steps)
    rules = rules_from_config(config) if rules is None else rules
    shapes, _ = abstract_state(model, tx, config, mesh, rules)
    state = ckpt.restore(shapes, step=step)
  finally:
    ckpt.close()
  return model, state.params, state.active, config, tokenizer
