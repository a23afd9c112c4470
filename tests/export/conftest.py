"""A tiny trained workdir and its export, shared by the export tests."""
import pytest

from tests.conftest import micro_config


@pytest.fixture(scope="session")
def trained_workdir(shapes_data_dir, tmp_path_factory):
  """Two training steps of the micro config: enough for an exactness test."""
  from clusjax.train.loop import train
  workdir = tmp_path_factory.mktemp("export_run")
  config = micro_config(shapes_data_dir, train__num_steps=2, train__checkpoint_every=2)
  train(config, str(workdir))
  return workdir


@pytest.fixture(scope="session")
def exported(trained_workdir):
  from clusjax.export import export_pytorch
  return export_pytorch(str(trained_workdir))
