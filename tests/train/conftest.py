"""A run with a non-finite step, shared by the skip and damaged-checkpoint tests, and
the fine-tunes of the shared trained workdir that the task tests share."""
import jax.numpy as jnp
import pytest

from tests.conftest import micro_config, task_micro_config

# The step (1-based) whose images the poisoned runs turn into inf.
POISONED_STEP = 7


def poison(batch, step):
  """`batch_transform` of `train`: the images of step POISONED_STEP (state.step =
  POISONED_STEP - 1) all inf, so its loss and gradients are not finite; the
  others as the model reads them (float)."""
  images = batch["image"].astype(jnp.float32)
  return {**batch, "image": jnp.where(step == POISONED_STEP - 1, jnp.inf, images)}


def poisoned_config(data_dir, **overrides):
  """8 steps, a checkpoint every 2 (all kept), clustering every 4 (after the skip)."""
  return micro_config(data_dir, train__num_steps=8, train__checkpoint_every=2,
                      train__keep_checkpoints=4, clustering__cluster_every=4, **overrides)


@pytest.fixture(scope="session")
def poisoned_run(shapes_data_dir, tmp_path_factory):
  """(config, workdir, final state) of `poisoned_config` trained with `poison`."""
  from clusjax.train.loop import train
  config = poisoned_config(shapes_data_dir)
  workdir = tmp_path_factory.mktemp("poisoned_run")
  _, state, _ = train(config.copy_and_resolve_references(), str(workdir), batch_transform=poison)
  return config, workdir, state


def finetune_of(trained_workdir, task, data_dir, tmp_path_factory, **overrides):
  """(config, workdir) of a `task` micro fine-tune (`task_micro_config` + overrides)
  initialised from `trained_workdir`, trained in a fresh folder named after the task."""
  from clusjax.train.loop import train
  config = task_micro_config(task, data_dir, **overrides)
  config.init_from = str(trained_workdir)
  workdir = tmp_path_factory.mktemp(f"{task}_run")
  train(config, str(workdir))
  return config, workdir
