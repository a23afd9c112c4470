"""The run's tokenizer, fixed once in its workdir: copied from the workdir or checkpoint
the weights come from (their token ids), from config.data.tokenizer or the distillation
teacher, or trained on the training captions (`get_tokenizer`)."""
import os
import shutil

import jax
from jax.experimental import multihost_utils

from clusjax import workdir as wd
from clusjax.data import Tokenizer
from clusjax.train.restore import load_tokenizer

# Captions read to train a tokenizer when the config names none.
TOKENIZER_TRAIN_CAPTIONS = 50_000


def _copy_hf_tokenizer(init_from, dest):
  src = init_from if os.path.isdir(init_from) else os.path.dirname(init_from)
  files = [f for f in wd.HF_TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  if not any(f in files for f in ("tokenizer.json", "vocab.txt")):
    raise FileNotFoundError(
        f"config.model.text.init_from={init_from!r}: no tokenizer.json or vocab.txt in {src!r}; "
        "the text tower needs the vocabulary it was trained with.")
  tmp = dest + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for f in files:
    shutil.copyfile(os.path.join(src, f), os.path.join(tmp, f))
  os.replace(tmp, dest)


def _copy_workdir_tokenizer(src_workdir, workdir):
  hf_dir = wd.path(src_workdir, wd.HF_TOKENIZER_DIR)
  if os.path.isdir(hf_dir):
    _copy_hf_tokenizer(hf_dir, wd.path(workdir, wd.HF_TOKENIZER_DIR))
  else:
    shutil.copyfile(wd.path(src_workdir, wd.TOKENIZER_FILE), wd.path(workdir, wd.TOKENIZER_FILE))


def distill_teacher(config):
  """The distillation teacher's workdir, or "" when the config distils nothing."""
  return config.get("distill", {}).get("teacher", "")


def get_tokenizer(config, workdir, train_source):
  """The workdir's tokenizer: copied from config.init_from's workdir,
  model.text.init_from's checkpoint, config.data.tokenizer or the distillation
  teacher's workdir, or trained on the training captions.

  Once in the workdir it is reused as is (resume, eval, export).
  """
  file = wd.path(workdir, wd.TOKENIZER_FILE)
  hf_dir = wd.path(workdir, wd.HF_TOKENIZER_DIR)
  init_from = config.model.text.init_from
  if jax.process_index() == 0 and not (os.path.exists(file) or os.path.isdir(hf_dir)):
    if config.get("init_from"):   # the weights read its token ids
      _copy_workdir_tokenizer(config.init_from, workdir)
    elif init_from:
      _copy_hf_tokenizer(init_from, hf_dir)
    elif config.data.tokenizer:
      if not os.path.exists(config.data.tokenizer):
        raise FileNotFoundError(f"config.data.tokenizer={config.data.tokenizer!r} does not exist.")
      shutil.copyfile(config.data.tokenizer, file)
    elif distill_teacher(config):   # the teacher reads the batch's token ids
      _copy_workdir_tokenizer(distill_teacher(config), workdir)
    else:
      n = min(len(train_source), TOKENIZER_TRAIN_CAPTIONS)
      captions = [train_source[i]["caption"] for i in range(n)]
      # Written whole or not at all: a run killed here must not leave half a model.
      Tokenizer.train(captions, file + ".partial", config.data.vocab_size)
      os.replace(file + ".partial", file)
      print(f"Trained a SentencePiece tokenizer on {n} captions -> {file}", flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer")
  return load_tokenizer(workdir)
