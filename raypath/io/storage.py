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
from typing import Any, Iterator, Literal

import fsspec

from raypath.errors import RaypathError
from raypath.io.activity import activity, current_activities  # noqa: F401 (re-exported)

#: Environment variables read for S3 settings (documented in the README).
ENV_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_PROFILE = "AWS_PROFILE"
ENV_RETRY_TOTAL_S = "RAYPATH_S3_RETRY_TOTAL_S"
ENV_CONNECT_TIMEOUT_S = "RAYPATH_S3_CONNECT_TIMEOUT_S"
ENV_READ_TIMEOUT_S = "RAYPATH_S3_READ_TIMEOUT_S"
DEFAULT_RETRY_TOTAL_S = 120.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0

#: fsspec cache types that make sense for random reads of a remote slide.
S3_CACHE_TYPES = ("readahead", "bytes", "blockcache", "background", "first", "none")
S3CacheType = Literal["readahead", "bytes", "blockcache", "background", "first", "none"]

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
    connect_timeout_s, read_timeout_s
        Timeouts of every S3 request (a frozen endpoint fails after these).
    retry_total_s
        Transient errors are retried (botocore adaptive mode, exponential
        backoff) until the endpoint has failed for about this long; then the
        stage stops with exit 4 (storage unavailable).
    """

    endpoint_url: str | None = None
    profile: str | None = None
    block_size_bytes: int = 512 * 1024
    cache_type: str = "readahead"
    anon: bool = False
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    retry_total_s: float = DEFAULT_RETRY_TOTAL_S

    def __post_init__(self) -> None:
        if self.cache_type not in S3_CACHE_TYPES:
            raise RaypathError(
                f"S3 cache type {self.cache_type!r} is not one of {', '.join(S3_CACHE_TYPES)}: "
                "pick one of those (--s3-cache-type; readahead suits tile reads)"
            )
        for name in ("connect_timeout_s", "read_timeout_s", "retry_total_s"):
            if not float(getattr(self, name)) > 0:
                raise RaypathError(f"S3 setting {name}={getattr(self, name)!r} must be a positive number of seconds")

    @classmethod
    def from_env(cls, **overrides: Any) -> "S3Options":
        kw: dict[str, Any] = dict(
            endpoint_url=os.environ.get(ENV_ENDPOINT) or None,
            profile=os.environ.get(ENV_PROFILE) or None,
        )
        for name, var in (("retry_total_s", ENV_RETRY_TOTAL_S), ("connect_timeout_s", ENV_CONNECT_TIMEOUT_S),
                          ("read_timeout_s", ENV_READ_TIMEOUT_S)):
            if os.environ.get(var):
                try:
                    kw[name] = float(os.environ[var])
                except ValueError:
                    raise RaypathError(f"${var}={os.environ[var]!r} is not a number of seconds: fix or unset it") from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def endpoint(self) -> str:
        """The endpoint as messages name it."""
        return self.endpoint_url or "the AWS S3 endpoint"

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / fsspec ``storage_options``
        (timeouts and botocore's adaptive retry mode included)."""
        opts: dict[str, Any] = {
            "default_block_size": self.block_size_bytes,
            "default_cache_type": self.cache_type,
            "anon": self.anon,
            "config_kwargs": {
                "connect_timeout": self.connect_timeout_s,
                "read_timeout": self.read_timeout_s,
                "retries": {"mode": "adaptive", "total_max_attempts": _max_attempts()},
            },
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
        from raypath.io.s3guard import GuardedS3FileSystem

        s3 = s3 or S3Options.from_env()
        opts = s3.storage_options()
        opts.pop("endpoint_url", None)
        return GuardedS3FileSystem(retry_total_s=s3.retry_total_s, **opts)
    return fsspec.filesystem(proto)


def _max_attempts() -> int:
    from raypath.io.s3guard import MAX_ATTEMPTS

    return MAX_ATTEMPTS


def configure_s3(retry_total_s: float | None = None, connect_timeout_s: float | None = None,
                 read_timeout_s: float | None = None) -> None:
    """Set this process's S3 timeouts and retry budget (and those of Ray workers it starts).

    The values go to ``$RAYPATH_S3_*`` so that every :meth:`S3Options.from_env`
    (here and in Ray workers, which inherit the environment) uses them.
    """
    for var, v in ((ENV_RETRY_TOTAL_S, retry_total_s), (ENV_CONNECT_TIMEOUT_S, connect_timeout_s),
                   (ENV_READ_TIMEOUT_S, read_timeout_s)):
        if v is not None:
            if not v > 0:
                raise RaypathError(f"{var.replace('RAYPATH_S3_', '--s3-').replace('_', '-').lower()} {v}: "
                                   "must be a positive number of seconds")
            os.environ[var] = repr(float(v))


def bucket_of(uri: str) -> str | None:
    """The bucket of an ``s3://bucket/key`` URI (``None`` for other URIs)."""
    if protocol_of(uri) not in ("s3", "s3a"):
        return None
    return strip_protocol(uri).split("/", 1)[0] or None


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def bucket_name_problem(name: str) -> str | None:
    """Why S3 would reject ``name`` as a bucket name (``None`` when it is valid).

    The rule (AWS general purpose buckets): 3-63 characters; lowercase letters,
    digits, dots and hyphens; starting and ending with a letter or digit; no
    ``..``; not an IP address; not starting with ``xn--``/``sthree-`` nor
    ending with ``-s3alias``/``--ol-s3``.
    """
    if not _BUCKET_RE.match(name or ""):
        return ("bucket names have 3-63 characters: lowercase letters, digits, dots and hyphens, "
                "beginning and ending with a letter or digit")
    if ".." in name or ".-" in name or "-." in name:
        return "bucket names cannot have two adjacent dots or a dot next to a hyphen"
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name):
        return "bucket names cannot look like an IP address"
    if name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3")):
        return "bucket names cannot start with 'xn--'/'sthree-' or end with '-s3alias'/'--ol-s3'"
    return None


def validate_bucket_name(name: str, flag: str = "--bucket") -> str:
    """``name`` if S3 accepts it, else a :class:`RaypathError` with the rule."""
    problem = bucket_name_problem(name)
    if problem:
        suggestion = re.sub(r"[^a-z0-9.-]+", "-", str(name).lower()).strip(".-")
        suggestion = (suggestion + "-bucket")[:63] if len(suggestion) < 3 else suggestion[:63]
        raise RaypathError(f"{flag} {name!r} is not a valid S3 bucket name: {problem} (e.g. {suggestion!r})")
    return name


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
    """Read a parquet file or dataset directory (local or remote) into a pyarrow Table.

    A file that is not parquet (cut short, overwritten) raises a one-sentence
    :class:`RaypathError` naming it, not pyarrow's traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if is_remote(uri):
            fs = filesystem_for(uri, s3)
            if fs.isdir(uri):  # a dataset directory (e.g. tiles.parquet/ of per-slide parts)
                return pq.read_table(strip_protocol(uri), filesystem=fs, **kw)
            with open_file(uri, "rb", s3) as f:
                return pq.read_table(f, **kw)
        return pq.read_table(strip_protocol(uri), **kw)
    except pa.ArrowInvalid as e:
        from raypath.errors import RaypathError

        raise RaypathError(f"{uri} is not a readable parquet table ({str(e).splitlines()[0][:160]}): re-run the "
                           "step that writes it (it is written atomically, so a damaged copy came from elsewhere)") from None


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


# --------------------------------------------------------------------------- outages


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:240]


def as_outage(exc: BaseException, s3: S3Options | None = None):
    """A :class:`~raypath.errors.StorageUnavailable` when ``exc`` was caused by
    the storage endpoint not answering (else ``None``): the caller raises it
    instead of blaming the file."""
    from raypath.errors import StorageUnavailable

    if isinstance(exc, StorageUnavailable):
        return exc
    from raypath.io.s3guard import outage_cause

    cause = outage_cause(exc)
    if cause is None:
        return None
    if isinstance(cause, StorageUnavailable):
        inner = getattr(cause, "cause", None)  # Ray's RayTaskError(StorageUnavailable) wraps the original
        cause = inner if isinstance(inner, StorageUnavailable) else cause
        if hasattr(cause, "endpoint"):
            return StorageUnavailable(cause.endpoint, cause.detail, cause.done)  # without Ray's traceback text
    kw = getattr(cause, "kwargs", None) or {}
    endpoint = (s3.endpoint if s3 else None) or _base_url(kw.get("endpoint_url")) or S3Options.from_env().endpoint
    if "seconds" in kw:  # raypath's own give-up: say what the endpoint did
        detail = f"no answer for {kw['seconds']:.0f} s, last error {kw.get('error')}"
    else:
        detail = _short(cause)
    return StorageUnavailable(str(endpoint), detail[:300])


def _base_url(url: str | None) -> str | None:
    if not url or "://" not in str(url):
        return None
    scheme, rest = str(url).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def endpoint_failing(s3: S3Options | None = None):
    """A :class:`~raypath.errors.StorageUnavailable` when this process currently
    sees ``s3``'s endpoint failing (a failure that is not obviously the
    endpoint's must not be blamed on a file then), else ``None``."""
    import sys

    if "raypath.io.s3guard" not in sys.modules:
        return None
    from raypath.errors import StorageUnavailable
    from raypath.io.s3guard import health

    s3 = s3 or S3Options.from_env()
    h = health(s3.endpoint_url)
    if h.tripped() or h.first_failure is not None:
        return StorageUnavailable(h.endpoint, f"failing for {h.failing_for() or 0:.0f} s: {h.last_error}")
    return None


def check_storage(uris, s3: S3Options | None = None) -> None:
    """Probe every bucket named in ``uris`` once, before a run starts.

    Raises
    ------
    StorageUnavailable
        The endpoint did not answer within the retry budget (exit 4).
    RaypathError
        A bucket does not exist (exit 2).
    """
    from raypath.errors import StorageUnavailable

    buckets = sorted({b for u in uris if u is not None and (b := bucket_of(str(u)))})
    if not buckets:
        return
    s3 = s3 or S3Options.from_env()
    fs = filesystem_for(f"s3://{buckets[0]}", s3)
    for b in buckets:
        try:
            fs.call_s3("head_bucket", Bucket=b)
        except Exception as e:  # classified below; anything else means the endpoint answered
            outage = as_outage(e, s3)
            if outage is not None:
                raise StorageUnavailable(outage.endpoint, f"probe of bucket {b!r} before the run: {outage.detail}") from None
            code = str((getattr(getattr(e, "__cause__", None), "response", None) or {}).get("Error", {}).get("Code", ""))
            if isinstance(e, FileNotFoundError) or code in ("404", "NoSuchBucket"):
                raise RaypathError(
                    f"bucket {b!r} does not exist at {s3.endpoint}: check the s3:// URI and AWS_ENDPOINT_URL, "
                    "or create the bucket"
                ) from None
