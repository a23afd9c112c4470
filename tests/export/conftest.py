"""The export of the shared tiny trained workdir (tests/conftest.py's `trained_workdir`)."""
import pytest


@pytest.fixture(scope="session")
def exported(trained_workdir):
  from clusjax.export import export_pytorch
  return export_pytorch(str(trained_workdir))
