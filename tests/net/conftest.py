"""nginx on 127.0.0.1 serving the digits shards (and accepting uploads), and a fault proxy in front of it."""
import shutil

import pytest

from tests.net.servers import FaultProxy, Nginx


@pytest.fixture(scope="session")
def nginx(tmp_path_factory, digits_shards):
    """nginx whose /digits/ holds the session's digits shard folder; /bare/ the same shards without manifest."""
    server = Nginx(tmp_path_factory.mktemp("nginx"))
    shutil.copytree(digits_shards, server.www / "digits")
    shutil.copytree(digits_shards, server.www / "bare", ignore=shutil.ignore_patterns("manifest.json"))
    yield server
    server.stop()


@pytest.fixture()
def proxy(nginx):
    """A fault-injecting proxy in front of nginx (fresh rules and counts per test)."""
    server = FaultProxy(nginx.port)
    yield server
    server.stop()
