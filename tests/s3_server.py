"""A real S3-compatible HTTP server on 127.0.0.1 for tests: moto in server mode.

Start one per test module (it takes under a second, but the buckets and state are shared):

    @pytest.fixture(scope="module")
    def s3():
        with S3Server() as server:
            yield server

Credentials are dummy values set in the environment for the server's lifetime; the endpoint
reaches fsspec through its usual config (``fsspec.config.conf["s3"]``), so code under test
opens ``s3://`` URIs exactly as a user would, with nothing written into a repository.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import fsspec.config

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    def __init__(self) -> None:
        self._server: Any = None
        self.endpoint_url = ""
        self._saved_env: dict[str, str | None] = {}
        self._saved_conf: Any = None
        self._fs: Any = None

    def __enter__(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._saved_env = {k: os.environ.get(k) for k in _ENV}
        os.environ.update(_ENV)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self._saved_conf = fsspec.config.conf.get("s3")
        fsspec.config.conf["s3"] = {"endpoint_url": self.endpoint_url}
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = self._saved_conf
        self._server.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def filesystem(self) -> Any:
        """An s3fs client of the test's own (not the one the code under test uses)."""
        import s3fs

        if self._fs is None:
            self._fs = s3fs.S3FileSystem(endpoint_url=self.endpoint_url, skip_instance_cache=True,
                                         use_listings_cache=False)
        return self._fs

    def new_bucket(self) -> str:
        """A fresh, empty bucket; tests never share one."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name
