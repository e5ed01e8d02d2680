"""One place for where bytes live: local paths and ``s3://`` URIs.

Every stage opens files through :func:`filesystem_for` so that local disk and
object storage behave the same.  S3 is reached with s3fs, configured
explicitly (endpoint, credentials from the environment or a profile, block
size and cache type): s3fs's default of a 50 MiB read-ahead on every seek
would turn a random 224 px tile read into a 50 MiB download.

Secrets never leave this module in clear text: :func:`redact` is what logs
and saved configs see.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec

#: Environment variables read for S3 settings (documented in the README).
ENV_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_PROFILE = "AWS_PROFILE"

# Matched against the whole key or its words: "hf_token" and "aws_secret_access_key"
# are secrets, "num_register_tokens" is not.
_SECRET_WORDS = {"secret", "token", "password", "passwd", "credential", "credentials", "apikey"}
_SECRET_PARTS = ("access_key", "key_id", "secret")


def _is_secret_key(key: str) -> bool:
    k = str(key).lower()
    return any(p in k for p in _SECRET_PARTS) or bool(_SECRET_WORDS & set(re.split(r"[^a-z0-9]+", k)))


@dataclass(frozen=True)
class S3Options:
    """How to reach S3.  Credentials are never stored here; s3fs/boto find
    them in the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``)
    or in the named profile.

    Parameters
    ----------
    endpoint_url
        Custom endpoint (moto, MinIO, rclone, Ceph).  ``None`` = AWS or
        ``$AWS_ENDPOINT_URL``.
    profile
        Named AWS profile, or ``None`` for ``$AWS_PROFILE``/default chain.
    block_size_bytes
        Read block size.  Small blocks suit random tile reads.
    cache_type
        fsspec cache type for random access (``"readahead"``, ``"bytes"``,
        ``"none"``, ``"blockcache"``).
    anon
        Anonymous access (public buckets).
    """

    endpoint_url: str | None = None
    profile: str | None = None
    block_size_bytes: int = 512 * 1024
    cache_type: str = "readahead"
    anon: bool = False

    @classmethod
    def from_env(cls, **overrides: Any) -> "S3Options":
        kw: dict[str, Any] = dict(
            endpoint_url=os.environ.get(ENV_ENDPOINT) or None,
            profile=os.environ.get(ENV_PROFILE) or None,
        )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / fsspec ``storage_options``."""
        opts: dict[str, Any] = {
            "default_block_size": self.block_size_bytes,
            "default_cache_type": self.cache_type,
            "anon": self.anon,
        }
        if self.endpoint_url:
            opts["client_kwargs"] = {"endpoint_url": self.endpoint_url}
            opts["endpoint_url"] = self.endpoint_url
        if self.profile:
            opts["profile"] = self.profile
        return opts


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def protocol_of(uri: str) -> str:
    uri = str(uri)
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem_for(uri: str, s3: S3Options | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``uri`` (local, ``s3://``, ``memory://`` ...)."""
    proto = protocol_of(uri)
    if proto in ("s3", "s3a"):
        import s3fs

        opts = (s3 or S3Options.from_env()).storage_options()
        opts.pop("endpoint_url", None)
        return s3fs.S3FileSystem(**opts)
    return fsspec.filesystem(proto)


def strip_protocol(uri: str) -> str:
    uri = str(uri)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return uri.split("://", 1)[1] if "://" in uri else uri


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping a URI scheme intact."""
    base = str(base)
    if is_remote(base):
        proto, rest = base.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def open_file(uri: str, mode: str = "rb", s3: S3Options | None = None, **kw: Any):
    """Open ``uri`` for reading or writing through the right filesystem."""
    fs = filesystem_for(uri, s3)
    return fs.open(strip_protocol(uri) if not is_remote(uri) else uri, mode, **kw)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    fs = filesystem_for(uri, s3)
    return fs.exists(uri if is_remote(uri) else strip_protocol(uri))


def makedirs(uri: str, s3: S3Options | None = None) -> None:
    if is_remote(uri):
        return  # object stores have no directories
    os.makedirs(strip_protocol(uri), exist_ok=True)


def atomic_write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write ``data`` so readers see either the old object or the whole new one.

    Local: write a temporary file in the same directory, fsync, ``os.replace``.
    S3: a single PUT is already atomic.
    """
    if is_remote(uri):
        fs = filesystem_for(uri, s3)
        fs.pipe_file(uri, data)
        return
    path = strip_protocol(uri)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_parquet_atomic(table, uri: str, s3: S3Options | None = None) -> None:
    """Write a pyarrow Table as one parquet object, atomically."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(uri, buf.getvalue(), s3)


def read_parquet(uri: str, s3: S3Options | None = None, **kw: Any):
    """Read a parquet file (local or remote) into a pyarrow Table."""
    import pyarrow.parquet as pq

    if is_remote(uri):
        with open_file(uri, "rb", s3) as f:
            return pq.read_table(f, **kw)
    return pq.read_table(strip_protocol(uri), **kw)


def redact(value: Any) -> Any:
    """Copy of ``value`` (dict/list/str) with secrets replaced by ``'***'``.

    Keys that look secret (``*secret*``, ``*token*``, ``*password*``, access
    keys) are masked, and credentials embedded in URLs
    (``scheme://user:pass@host``) are stripped.
    """
    if isinstance(value, dict):
        return {
            k: ("***" if _is_secret_key(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return re.sub(r"(://)[^/@\s]+:[^/@\s]+@", r"\1***@", value)
    return value


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Temporarily set (or unset with ``None``) environment variables."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
