"""clusjax: Clus image-text pre-training in JAX/Flax.

The one entry point most users need is `clusjax.load_pretrained(workdir)`.
It is imported lazily so that `import clusjax.config` (used to reject bad
flags in milliseconds) does not pull in jax.
"""


def load_pretrained(workdir, step=None):
  """A trained model with encode_image / encode_text; see clusjax/api.py."""
  from clusjax.api import load_pretrained as _load
  return _load(workdir, step=step)


def load_finetuned(workdir, step=None):
  """A fine-tuned model (VQA `answer`, NLVR2 `verify`, `caption`, retrieval); see
  clusjax/api.py."""
  from clusjax.api import load_finetuned as _load
  return _load(workdir, step=step)


__all__ = ["load_finetuned", "load_pretrained"]
