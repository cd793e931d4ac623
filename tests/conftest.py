from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def worker_id_tag(request: pytest.FixtureRequest) -> str:
    """A name component unique to this xdist worker."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw-main")
    return worker.replace("/", "-")
