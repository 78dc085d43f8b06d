"""Fixtures shared by the server test modules (one xdist group, so one worker builds them once)."""

import pytest

from tests.serve.server_fixtures import make_workdir


@pytest.fixture(scope='session')
def server_workdir(tmp_path_factory):
  """A tiny model's training workdir (server_fixtures.make_workdir), served by the server tests."""
  return make_workdir(str(tmp_path_factory.mktemp('serve')))
