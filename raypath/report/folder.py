"""Read-only access to a local or ``s3://`` folder of outputs (a run, a sweep, a workdir)."""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any

from raypath.io.storage import S3Options, filesystem_for, is_remote, join, strip_protocol


class Folder:
    """A folder the report pages read: files below it, JSON, text and parquet."""

    def __init__(self, uri: str, s3: S3Options | None = None):
        self.uri = str(uri).rstrip("/")
        self.s3 = s3
        self.fs = filesystem_for(self.uri, s3)
        self.path = self.uri if is_remote(self.uri) else strip_protocol(self.uri)
        self.name = self.uri.rsplit("/", 1)[-1]

    def _p(self, rel: str) -> str:
        return posixpath.join(self.path, rel) if rel else self.path

    def sub(self, rel: str) -> "Folder":
        return Folder(join(self.uri, rel), self.s3)

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._p(rel))

    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(self._p(rel))

    def read(self, rel: str) -> bytes:
        with self.fs.open(self._p(rel), "rb") as f:
            return f.read()

    def text(self, rel: str) -> str | None:
        """The file as UTF-8 text, or None when it is binary (Ray Tune keeps pickles under .json names)."""
        try:
            return self.read(rel).decode()
        except UnicodeDecodeError:
            return None

    def json(self, rel: str) -> Any:
        return json.loads(self.read(rel).decode())

    def json_or_none(self, rel: str) -> Any:
        try:
            return self.json(rel) if self.exists(rel) else None
        except (ValueError, UnicodeDecodeError, OSError):
            return None

    def parquet(self, rel: str, columns: list[str] | None = None):
        """A parquet file or dataset directory as a pandas DataFrame."""
        from raypath.io.storage import read_parquet

        kw = {"columns": columns} if columns else {}
        return read_parquet(join(self.uri, rel), self.s3, **kw).to_pandas()

    def csv(self, rel: str):
        import pandas as pd

        return pd.read_csv(io.BytesIO(self.read(rel)))

    def files(self, max_depth: int = 3) -> list[str]:
        """Relative paths (``/``-separated) of files below the folder, sorted."""
        if not self.exists():
            return []
        # fsspec returns absolute local paths and protocol-less remote keys
        base = strip_protocol(self.uri) if is_remote(self.uri) else os.path.abspath(self.path)
        base = base.replace(os.sep, "/").rstrip("/")
        out = []
        for p in self.fs.find(self.path, maxdepth=max_depth):
            p = str(p).replace(os.sep, "/")
            if p.startswith(base + "/"):
                out.append(p[len(base) + 1:])
        return sorted(out)

    def subdirs(self, rel: str = "") -> list[str]:
        if not self.exists(rel):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(rel), detail=False)
                      if self.fs.isdir(p))
