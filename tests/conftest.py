"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def parity_dir() -> pathlib.Path:
  """The parity fixture directory: $MMADA_PARITY_DIR, or the copy under tests/fixtures/parity."""
  return pathlib.Path(os.environ.get("MMADA_PARITY_DIR") or FIXTURES / "parity")


@pytest.fixture(scope="session")
def parity_path() -> pathlib.Path:
  return parity_dir()
