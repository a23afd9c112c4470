"""Distillation from a frozen teacher workdir (config.distill, paper Eq. 1)."""
import filecmp
import json

import jax
import numpy as np
import pytest

from clusjax import workdir as wd
from clusjax.config import ConfigError, validate
from clusjax.data import Tokenizer, shapes
from clusjax.parallel.mesh import create_mesh
from clusjax.train.loop import train
from clusjax.train.restore import restore_model
from tests.conftest import micro_config

# ITC only, so that the runs are small and the ITC term is the whole loss.
ITC_ONLY = dict(loss__itm_weight=0.0, loss__mlm_weight=0.0, loss__swap_prediction=False,
                loss__prompt_weight=0.0, loss__noun_code_weight=0.0,
                loss__noun_code_text_weight=0.0, loss__unimodal__image_weight=0.0,
                loss__unimodal__text_weight=0.0, train__num_steps=3)


def _losses(workdir):
  with open(wd.path(workdir, wd.METRICS_FILE)) as f:
    return [m["loss"] for m in map(json.loads, f) if "loss" in m]


def _params(workdir):
  mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return jax.tree.leaves(jax.device_get(restore_model(str(workdir), mesh)[1]))


def test_student_learns_from_a_frozen_teacher(shapes_data_dir, tmp_path):
  teacher = tmp_path / "teacher"
  train(micro_config(shapes_data_dir, **ITC_ONLY), str(teacher))
  before = _params(teacher)

  # alpha = 0 leaves only the cross-entropy on the pairs: the plain ITC run,
  # so the student (same seed, data and tokenizer) retraces the teacher's run.
  ce_only = tmp_path / "ce_only"
  train(micro_config(shapes_data_dir, **ITC_ONLY, distill__teacher=str(teacher),
                     distill__alpha=0.0), str(ce_only))
  assert filecmp.cmp(teacher / wd.TOKENIZER_FILE, ce_only / wd.TOKENIZER_FILE, shallow=False)
  np.testing.assert_allclose(_losses(ce_only), _losses(teacher), rtol=1e-6)

  student = tmp_path / "student"
  train(micro_config(shapes_data_dir, **ITC_ONLY, distill__teacher=str(teacher),
                     distill__alpha=0.45, distill__temperature=2.0), str(student))
  losses = _losses(student)
  assert np.isfinite(losses).all() and not np.allclose(losses, _losses(teacher), rtol=1e-3)
  # The teacher is read, never written.
  for a, b in zip(before, _params(teacher)):
    np.testing.assert_array_equal(a, b)

  # A teacher that reads other inputs is refused before anything compiles.
  with pytest.raises(ConfigError, match=r"data\.max_text_len=24; config\.data\.max_text_len=16"):
    validate(micro_config(shapes_data_dir, **ITC_ONLY, distill__teacher=str(teacher),
                          data__max_text_len=16))
  other_tokens = tmp_path / "other_tokens"
  other_tokens.mkdir()
  Tokenizer.train(shapes.make_split("train", 256, 32)["captions"],
                  str(other_tokens / wd.TOKENIZER_FILE), 100)
  with pytest.raises(ConfigError, match="has another tokenizer"):
    train(micro_config(shapes_data_dir, **ITC_ONLY, distill__teacher=str(teacher)),
          str(other_tokens))


@pytest.mark.parametrize("overrides,message", [
    (dict(distill__teacher="/no/such/workdir"), r"distill\.teacher='/no/such/workdir' is not"),
    (dict(distill__teacher=".", loss__itc__kind="siglip"), r"needs config\.loss\.itc\.kind"),
])
def test_bad_distill_config_names_the_key(shapes_data_dir, tmp_path, overrides, message):
  (tmp_path / wd.CONFIG_FILE).write_text("{}")
  overrides = {k: (str(tmp_path) if v == "." else v) for k, v in overrides.items()}
  with pytest.raises(ConfigError, match=message):
    validate(micro_config(shapes_data_dir, **overrides))
