"""`--mode=export`: a trained workdir as files that PyTorch / transformers load.

    export_pytorch("workdirs/tiny")      # -> workdirs/tiny/export/ (W/export)

    export/
      vision_model/      config.json, model.safetensors     -> ViTModel.from_pretrained
                         preprocessor_config.json           -> ViTImageProcessor.from_pretrained
      text_model/        config.json, model.safetensors     -> BertModel.from_pretrained
                         tokenizer.json, tokenizer_config.json -> AutoTokenizer.from_pretrained
      heads.safetensors  vision_projection.{weight, bias}  [E, Wv], [E]   torch nn.Linear layout
                         text_projection.{weight, bias}    [E, Wt], [E]
                         temperature                       []   ITC logits = sim / temperature
                         prototypes_active                 [K_max] bool: the columns of
                                                           `prototypes` that are clusters now
                         <name>.<flax path>   every other top-level param subtree (fusion,
                                              itm_head, ...), Flax layout (Dense kernels [in, out])
      tokenizer.model    the SentencePiece model clusjax trained and encodes with
      clusjax_config.json  the run's config
      README.md          a ten-line PyTorch example

An embedding is normalize(linear(last_hidden_state[:, 0], W, b)): what
ClusModel.encode_image / encode_text compute. The encoders have no pooler;
the files carry an identity one (pooler_output = tanh(CLS), unused by Clus) so
that a plain `from_pretrained` reports no missing keys (with
`add_pooling_layer=False` the two pooler keys are reported unexpected instead).
"""
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from clusjax import workdir as wd
from clusjax.api import load_pretrained
from clusjax.export.hf_convert import (bert_config_to_hf, bert_params_to_hf, vit_config_to_hf,
                                       vit_params_to_hf)
from clusjax.export.tokenizer_json import sentencepiece_to_hf, write_tokenizer_files
from clusjax.models.clus import IMAGE_MEAN, IMAGE_STD
from clusjax.train.checkpoint import Checkpointer

EXPORT_DIR = "export"
HEADS_FILE = "heads.safetensors"
# Param subtrees with a file of their own (or a fixed name in heads.safetensors).
_NAMED = ("vision", "text", "vision_proj", "text_proj", "temperature")
_PIL_BICUBIC = 3   # PIL.Image.BICUBIC: clusjax.data.pipeline resizes with it

README = '''# clusjax export (step {step})

Embed an image and a text in PyTorch and print their cosine similarity
(`pip install torch transformers safetensors pillow`):

```python
import torch, torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertModel, ViTImageProcessor, ViTModel
d = "{out_dir}"; heads = load_file(f"{{d}}/heads.safetensors")
vit, processor = ViTModel.from_pretrained(f"{{d}}/vision_model").eval(), ViTImageProcessor.from_pretrained(f"{{d}}/vision_model")
bert, tokenizer = BertModel.from_pretrained(f"{{d}}/text_model").eval(), AutoTokenizer.from_pretrained(f"{{d}}/text_model")
img = F.normalize(F.linear(vit(**processor(Image.open("image.png").convert("RGB"), return_tensors="pt")).last_hidden_state[:, 0], heads["vision_projection.weight"], heads["vision_projection.bias"]), dim=-1)
txt = F.normalize(F.linear(bert(**tokenizer(["{caption}"], truncation=True, return_tensors="pt")).last_hidden_state[:, 0], heads["text_projection.weight"], heads["text_projection.bias"]), dim=-1)
print(f"similarity {{(img @ txt.T).item():.4f}}")
```

ITC logits are `img @ txt.T / heads["temperature"]`. The features equal
`clusjax.load_pretrained(workdir).encode_image / encode_text` to about 1e-6
in float32. Images are resized to {size}x{size} (bicubic), scaled to [-1, 1];
texts are truncated to {max_len} tokens ([CLS] ... [SEP]).

- `vision_model/`, `text_model/`: ViTModel / BertModel (transformers >= 5). The
  pooler is an identity placeholder (Clus uses the CLS state).
- `heads.safetensors`: `vision_projection.*`, `text_projection.*` (nn.Linear
  layout), `temperature`, `prototypes_active` (which prototype columns are
  clusters); any other key `<name>.<path>` is a clusjax param subtree (fusion,
  LongNet, ITM/MLM heads, prototypes) in Flax layout (Dense kernels [in, out]).
- `tokenizer.model`: the SentencePiece model that `text_model/tokenizer.json`
  reproduces; `clusjax_config.json`: the training config.
'''


def _save(tensors, file, metadata=None):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, file,
            metadata={"format": "pt", **(metadata or {})})


def _write_json(obj, file):
  with open(file, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def _identity_pooler(width):
  return {"pooler.dense.weight": np.eye(width, dtype=np.float32),
          "pooler.dense.bias": np.zeros((width,), np.float32)}


def _linear(dense, name):
  """Flax Dense {kernel [in, out], bias} -> torch nn.Linear {weight [out, in], bias}."""
  out = {f"{name}.weight": np.asarray(dense["kernel"]).T}
  if "bias" in dense:
    out[f"{name}.bias"] = np.asarray(dense["bias"])
  return out


def _heads(params, active):
  from flax import traverse_util
  heads = {**_linear(params["vision_proj"], "vision_projection"),
           **_linear(params["text_proj"], "text_projection"),
           "temperature": np.asarray(params["temperature"], np.float32),
           "prototypes_active": np.asarray(active, bool)}
  for name in sorted(set(params) - set(_NAMED)):
    tree = params[name]
    if hasattr(tree, "items"):
      heads.update({f"{name}.{k}": np.asarray(v)
                    for k, v in traverse_util.flatten_dict(tree, sep=".").items()})
    else:
      heads[name] = np.asarray(tree)
  return heads


def _latest_step(workdir):
  directory = wd.path(workdir, wd.CHECKPOINT_DIR)
  step = None
  if os.path.isdir(directory):
    ckpt = Checkpointer(directory, read_only=True)
    step = ckpt.latest_step()
    ckpt.close()
  if step is None:
    raise FileNotFoundError(
        f"no checkpoint in {directory}: nothing to export. Train first (python launch/main.py "
        f"--config=... --workdir={workdir}).")
  return step


def _check_out_dir(out_dir, overwrite):
  if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
    return
  if not overwrite:
    raise FileExistsError(f"{out_dir} already exists: pass --overwrite (export_pytorch(..., "
                          "overwrite=True)) to replace it, or choose another directory.")
  if not os.path.isfile(os.path.join(out_dir, HEADS_FILE)):
    raise FileExistsError(f"{out_dir} exists and is not a clusjax export (no {HEADS_FILE}); "
                          "refusing to delete it: choose another directory.")


def _write(pretrained, workdir, step, out):
  config, params = pretrained.config, jax.device_get(pretrained.params)
  vision, text = config.model.vision, config.model.text
  size, max_len = config.data.image_size, config.data.max_text_len

  vision_dir = os.path.join(out, "vision_model")
  os.makedirs(vision_dir)
  _save({**vit_params_to_hf(params["vision"], num_heads=vision.num_heads),
         **_identity_pooler(vision.width)}, os.path.join(vision_dir, "model.safetensors"))
  _write_json(vit_config_to_hf(
      patch_size=vision.patch_size, width=vision.width, depth=vision.depth,
      num_heads=vision.num_heads, mlp_dim=vision.mlp_dim, image_size=size,
      dropout=config.model.dropout), os.path.join(vision_dir, "config.json"))
  _write_json({"image_processor_type": "ViTImageProcessor", "do_resize": True,
               "size": {"height": size, "width": size}, "resample": _PIL_BICUBIC,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [IMAGE_MEAN] * 3, "image_std": [IMAGE_STD] * 3},
              os.path.join(vision_dir, "preprocessor_config.json"))

  text_dir = os.path.join(out, "text_model")
  os.makedirs(text_dir)
  text_sd = bert_params_to_hf(params["text"], num_heads=text.num_heads)
  _save({**text_sd, **_identity_pooler(text.width)}, os.path.join(text_dir, "model.safetensors"))
  _write_json(bert_config_to_hf(
      # The padded table's row count (clus.padded_vocab_size), so the shapes load.
      vocab_size=text_sd["embeddings.word_embeddings.weight"].shape[0], width=text.width,
      depth=text.depth, num_heads=text.num_heads, mlp_dim=text.mlp_dim, max_len=max_len,
      dropout=config.model.dropout), os.path.join(text_dir, "config.json"))
  hf_dir = wd.path(workdir, wd.HF_TOKENIZER_DIR)
  if os.path.isdir(hf_dir):
    # The text tower started from a BERT checkpoint and kept its WordPiece files.
    for name in os.listdir(hf_dir):
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(text_dir, name))
  else:
    spm_file = wd.path(workdir, wd.TOKENIZER_FILE)
    with open(spm_file, "rb") as f:
      write_tokenizer_files(sentencepiece_to_hf(f.read()), text_dir, max_len=max_len)
    shutil.copyfile(spm_file, os.path.join(out, "tokenizer.model"))

  _save(_heads(params, pretrained.active), os.path.join(out, HEADS_FILE), {"step": str(step)})
  shutil.copyfile(wd.path(workdir, wd.CONFIG_FILE), os.path.join(out, "clusjax_config.json"))


def _apply_umask(tree):
  """mkdtemp and safetensors create owner-only (0700 / 0600) paths; an export is for sharing."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tree, 0o777 & ~umask)
  for root, dirs, files in os.walk(tree):
    for name in dirs:
      os.chmod(os.path.join(root, name), 0o777 & ~umask)
    for name in files:
      os.chmod(os.path.join(root, name), 0o666 & ~umask)


def export_pytorch(workdir, out_dir=None, *, overwrite=False):
  """Writes the latest checkpoint of `workdir` to `out_dir` (default W/export); returns it.

  Raises FileNotFoundError when the workdir has no checkpoint and
  FileExistsError when out_dir holds files and overwrite is False. The files
  are written to a temporary sibling and moved into place at the end, so a
  failed export leaves no half-written out_dir.
  """
  out_dir = os.path.abspath(out_dir or wd.path(workdir, EXPORT_DIR))
  config = wd.load_config(workdir)   # names a non-workdir before anything else
  stem = config.model.vision.get("stem", "patch")
  if stem != "patch":
    raise ValueError(f"{workdir}: config.model.vision.stem={stem!r} has no transformers "
                     "ViTModel counterpart (its patch embedding is one linear projection); "
                     "export needs stem='patch'.")
  step = _latest_step(workdir)
  _check_out_dir(out_dir, overwrite)
  pretrained = load_pretrained(workdir, step=step)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.partial-")
  try:
    _write(pretrained, workdir, step, tmp)
    with open(os.path.join(tmp, "README.md"), "w") as f:
      f.write(README.format(step=step, out_dir=out_dir, size=pretrained.config.data.image_size,
                            max_len=pretrained.config.data.max_text_len,
                            caption="a small red circle on the left."))
    _apply_umask(tmp)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)   # an earlier export (_check_out_dir) or an empty directory
    os.replace(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return out_dir
