"""export_pytorch / --mode=export: the files load in transformers and give clusjax's outputs."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import clusjax
from clusjax.data.shapes import make_split
from clusjax.export import export_pytorch
from clusjax.export.pytorch import _heads
from clusjax.models.clus import preprocess_images
from tests.conftest import ROOT, micro_flags, subprocess_env

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Spacing, case, punctuation and Unicode that SentencePiece normalises.
ODD_TEXTS = ["", "   ", "A  LARGE   Red Circle.", "  leading and trailing  ", "tabs\tand\nnewlines",
             "École café naïve", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "unknown ✓ ☃☃ 中文", "x" * 80,
             "123,456.78 !!!", "the circle,the square;TRIANGLE?", "ß straße ﬁ",
             "\u00a0nbsp\u2003em"]


def _load(exported):
  """The four transformers objects of an export, asserting clean weight loads."""
  vit, info = transformers.ViTModel.from_pretrained(os.path.join(exported, "vision_model"),
                                                    output_loading_info=True)
  bert, info2 = transformers.BertModel.from_pretrained(os.path.join(exported, "text_model"),
                                                       output_loading_info=True)
  for loading in (info, info2):
    assert not (loading["missing_keys"] or loading["unexpected_keys"]
                or loading["mismatched_keys"]), loading
  processor = transformers.ViTImageProcessor.from_pretrained(os.path.join(exported, "vision_model"))
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(exported, "text_model"))
  return vit.eval(), bert.eval(), processor, tokenizer


def _embed(cls_state, heads, name):
  features = torch.nn.functional.linear(cls_state, heads[f"{name}.weight"], heads[f"{name}.bias"])
  return torch.nn.functional.normalize(features, dim=-1).numpy()


def test_exported_model_matches_load_pretrained(trained_workdir, exported):
  from safetensors.torch import load_file
  model = clusjax.load_pretrained(str(trained_workdir))
  vit, bert, processor, tokenizer = _load(exported)
  heads = load_file(os.path.join(exported, "heads.safetensors"))
  size, max_len = model.config.data.image_size, model.config.data.max_text_len
  test = make_split("test", 16, size)
  captions = list(test["captions"])

  pixels = processor(list(test["images"]), return_tensors="pt")["pixel_values"]
  np.testing.assert_allclose(pixels.numpy(), np.asarray(preprocess_images(test["images"]))
                             .transpose(0, 3, 1, 2), atol=1e-6)
  tokens = tokenizer(captions, padding="max_length", max_length=max_len, truncation=True,
                     return_tensors="pt")
  ids, mask = model.tokenizer.encode(captions, max_len)
  np.testing.assert_array_equal(tokens["input_ids"].numpy(), ids)
  np.testing.assert_array_equal(tokens["attention_mask"].numpy(), mask)

  with torch.no_grad():
    img = _embed(vit(pixel_values=pixels).last_hidden_state[:, 0], heads, "vision_projection")
    txt = _embed(bert(**tokens).last_hidden_state[:, 0], heads, "text_projection")
  img_diff = np.abs(img - model.encode_image(test["images"])).max()
  txt_diff = np.abs(txt - model.encode_text(captions)).max()
  print(f"export max abs diff: image {img_diff:.2e}, text {txt_diff:.2e}")
  assert img_diff < 1e-4 and txt_diff < 1e-4
  np.testing.assert_allclose(heads["temperature"].numpy(), model.params["temperature"], rtol=0)
  np.testing.assert_array_equal(heads["prototypes_active"].numpy(), model.active)


def test_tokenizer_json_gives_sentencepiece_ids(trained_workdir, exported):
  from clusjax.data.hf_tokenizer import HFTokenizer
  ours = clusjax.load_pretrained(str(trained_workdir)).tokenizer
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(exported, "text_model"))
  texts = list(make_split("val", 300, 32, seed=3)["captions"]) + ODD_TEXTS
  for max_len in (24, 8):
    ids, mask = ours.encode(texts, max_len)
    theirs = tokenizer(texts, padding="max_length", max_length=max_len, truncation=True)
    np.testing.assert_array_equal(np.array(theirs["input_ids"]), ids)
    np.testing.assert_array_equal(np.array(theirs["attention_mask"]), mask)
    np.testing.assert_array_equal(
        HFTokenizer.from_pretrained(os.path.join(exported, "text_model")).encode(texts, max_len)[0],
        ids)
  assert tokenizer.decode(ids[2], skip_special_tokens=True) == ours.decode(ids[2])[0]


def test_readme_snippet_runs(trained_workdir, exported, tmp_path, monkeypatch, capsys):
  import PIL.Image
  readme = open(os.path.join(exported, "README.md")).read()
  code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  assert len(code.strip().splitlines()) == 10
  model = clusjax.load_pretrained(str(trained_workdir))
  image = make_split("test", 1, model.config.data.image_size)["images"]
  PIL.Image.fromarray(image[0]).save(tmp_path / "image.png")
  caption = re.search(r'tokenizer\(\["(.*?)"\]', code).group(1)
  monkeypatch.chdir(tmp_path)
  exec(compile(code, "README.md", "exec"), {})
  printed = float(capsys.readouterr().out.split()[-1])
  expected = (model.encode_image(image) @ model.encode_text([caption]).T).item()
  assert abs(printed - expected) < 1e-4


def test_heads_export_other_subtrees_under_their_names():
  rng = np.random.default_rng(0)
  params = {"vision": {}, "text": {},
            "vision_proj": {"kernel": rng.normal(size=(8, 4)), "bias": rng.normal(size=4)},
            "text_proj": {"kernel": rng.normal(size=(6, 4))},
            "temperature": np.float32(0.07),
            "fusion": {"image_block_0": {"attn": {"query": {"kernel": np.ones((8, 2, 4))}}}},
            "itm_head": {"kernel": np.ones((8, 2)), "bias": np.zeros(2)},
            "prototypes": np.ones((4, 16))}
  heads = _heads(params, np.arange(16) < 5)
  assert set(heads) == {"vision_projection.weight", "vision_projection.bias",
                        "text_projection.weight", "temperature", "prototypes_active",
                        "fusion.image_block_0.attn.query.kernel", "itm_head.kernel",
                        "itm_head.bias", "prototypes"}
  np.testing.assert_array_equal(heads["vision_projection.weight"],
                                params["vision_proj"]["kernel"].T)
  assert heads["fusion.image_block_0.attn.query.kernel"].shape == (8, 2, 4)   # Flax layout
  assert heads["temperature"].shape == ()


def test_export_refuses_without_checkpoint_or_overwrite(trained_workdir, exported, tmp_path):
  empty = tmp_path / "untrained"
  empty.mkdir()
  (empty / "config.json").write_text((trained_workdir / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*untrained"):
    export_pytorch(str(empty))
  with pytest.raises(FileNotFoundError, match="not a clusjax workdir"):
    export_pytorch(str(tmp_path / "missing"))

  before = {f: os.path.getmtime(os.path.join(exported, f)) for f in os.listdir(exported)}
  with pytest.raises(FileExistsError, match="--overwrite"):
    export_pytorch(str(trained_workdir))
  assert before == {f: os.path.getmtime(os.path.join(exported, f)) for f in os.listdir(exported)}
  other = tmp_path / "notes"
  other.mkdir()
  (other / "mine.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a clusjax export"):
    export_pytorch(str(trained_workdir), str(other), overwrite=True)
  assert (other / "mine.txt").read_text() == "keep me"


def test_launch_export_mode(shapes_data_dir, trained_workdir, exported, tmp_path):
  """--mode=export: refuses an existing export, replaces it with --overwrite."""
  main = [sys.executable, os.path.join(ROOT, "launch", "main.py"),
          "--config=" + os.path.join(ROOT, "configs", "clus_base.py:tiny"), "--mode=export",
          f"--workdir={trained_workdir}"] + micro_flags(shapes_data_dir)
  env = subprocess_env()
  proc = subprocess.run(main, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2 and "pass --overwrite" in proc.stderr, proc.stderr[-2000:]
  stale = os.path.join(exported, "stale.txt")   # must go: the export is replaced, not merged
  open(stale, "w").close()
  proc = subprocess.run(main + ["--overwrite"], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"to {exported}" in proc.stdout and not os.path.exists(stale)
  assert os.path.isfile(os.path.join(exported, "heads.safetensors"))
  assert json.load(open(os.path.join(exported, "clusjax_config.json")))["data"]["image_size"] == 32
