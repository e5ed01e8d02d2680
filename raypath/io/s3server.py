"""An embedded S3 endpoint (moto's threaded server) that raypath starts and stops.

The demo and the tests use it so the S3 code path is exercised on every run
without a bucket.  ``raypath s3 serve DIR`` also publishes a local folder as a
bucket for users who want to try the S3 path on their own slides.

The endpoint is in-memory and bound to 127.0.0.1; credentials are dummies
that moto accepts.  Nothing here is meant for production data.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from raypath.io.storage import S3Options

log = logging.getLogger(__name__)

#: Dummy credentials moto accepts; they are not secrets.
_DUMMY_KEY = "raypath-embedded"
_DUMMY_SECRET = "raypath-embedded-secret"
_REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedS3:
    """A running moto S3 server.  Use as a context manager or call stop()."""

    endpoint_url: str
    _server: object

    @property
    def options(self) -> S3Options:
        return S3Options(endpoint_url=self.endpoint_url)

    def environment(self) -> dict[str, str]:
        """Environment that makes plain ``s3://`` URIs reach this endpoint
        (s3fs, boto3, Ray Data and Ray Train storage all honour it)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": _DUMMY_KEY,
            "AWS_SECRET_ACCESS_KEY": _DUMMY_SECRET,
            "AWS_DEFAULT_REGION": _REGION,
            # moto and some S3 servers reject the newer default checksums on ranged GETs
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        }

    def export_environment(self) -> None:
        os.environ.update(self.environment())

    def create_bucket(self, name: str) -> str:
        from raypath.io.storage import validate_bucket_name

        validate_bucket_name(name, "bucket")
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def filesystem(self):
        import s3fs

        env = self.environment()
        return s3fs.S3FileSystem(
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": self.endpoint_url},
            default_block_size=S3Options().block_size_bytes,
            default_cache_type=S3Options().cache_type,
            config_kwargs=S3Options().storage_options()["config_kwargs"],  # timeouts + retries, as everywhere
            skip_instance_cache=True,
        )

    def upload_dir(self, local_dir: str | os.PathLike, bucket: str, prefix: str = "") -> str:
        """Copy a local folder into ``s3://bucket/prefix`` and return that URI."""
        self.create_bucket(bucket)
        fs = self.filesystem()
        root = Path(local_dir)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                key = "/".join(x for x in (bucket, prefix, p.relative_to(root).as_posix()) if x)
                fs.put_file(str(p), key)
        return "s3://" + "/".join(x for x in (bucket, prefix) if x)

    def stop(self) -> None:
        self._server.stop()  # type: ignore[attr-defined]

    def __enter__(self) -> "EmbeddedS3":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_embedded_s3(port: int = 0, export_env: bool = True) -> EmbeddedS3:
    """Start moto's S3 server on 127.0.0.1 and (by default) point the
    process environment at it, so child Ray workers inherit the endpoint."""
    from moto.server import ThreadedMotoServer

    for name in ("werkzeug", "moto"):
        logging.getLogger(name).setLevel(logging.ERROR)
    port = port or _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = EmbeddedS3(endpoint_url=f"http://127.0.0.1:{port}", _server=server)
    if export_env:
        s3.export_environment()
    log.info("embedded S3 endpoint at %s", s3.endpoint_url)
    return s3


def serve_forever(local_dir: str, bucket: str, port: int) -> Iterator[str]:  # pragma: no cover - CLI loop
    """Serve ``local_dir`` as ``s3://bucket`` until interrupted (CLI helper)."""
    import time

    s3 = start_embedded_s3(port=port)
    uri = s3.upload_dir(local_dir, bucket)
    try:
        yield uri
        while True:
            time.sleep(3600)
    finally:
        s3.stop()
