"""Thin file access for local paths and ``gs://bucket/key`` (google-cloud-storage), plus ``hf://``.

Paths are strings. ``gs://`` talks to Google Cloud Storage with application-default credentials,
or, when ``STORAGE_EMULATOR_HOST`` is set, to that emulator anonymously. ``hf://org/name`` only
resolves to a local snapshot (huggingface_hub); nothing writes there.

Remote folders used as inputs are downloaded to a local cache (``POSTTRAIN_CACHE``, default
``~/.cache/posttrain``) because safetensors memory-maps local files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

GCS_PREFIX = "gs://"
HF_PREFIX = "hf://"


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS_PREFIX)


def is_hf(path: str) -> bool:
    return str(path).startswith(HF_PREFIX)


def split_gcs(path: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
    if not is_gcs(path):
        raise ValueError(f"not a gs:// path: {path!r}")
    bucket, _, key = path[len(GCS_PREFIX) :].partition("/")
    if not bucket:
        raise ValueError(f"gs:// path has no bucket: {path!r}")
    return bucket, key


def join(path: str, *parts: str) -> str:
    if is_gcs(path):
        return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(path, *parts)


@functools.cache
def gcs_client() -> Any:
    from google.cloud import storage as gcs

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return gcs.Client(project="posttrain-emulator", credentials=AnonymousCredentials())
    return gcs.Client()


def _blob(path: str) -> Any:
    bucket, key = split_gcs(path)
    return gcs_client().bucket(bucket).blob(key)


# --------------------------------------------------------------------------- files


def exists(path: str) -> bool:
    if is_gcs(path):
        if _blob(path).exists():
            return True
        return bool(list_dir(path))  # a "folder" exists when something is under it
    return os.path.exists(path)


def read_bytes(path: str) -> bytes:
    if is_gcs(path):
        return _blob(path).download_as_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def write_bytes(path: str, data: bytes) -> None:
    if is_gcs(path):
        _blob(path).upload_from_string(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def open_file(path: str, mode: str = "rb") -> Iterator[IO[Any]]:
    """open() for local paths and gs:// (streamed reads/writes via the client's blob.open)."""
    if is_gcs(path):
        with _blob(path).open(mode) as f:
            yield f
        return
    if any(m in mode for m in "wa"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, mode) as f:
        yield f


def list_dir(path: str, *, recursive: bool = False) -> list[str]:
    """Names (relative to ``path``) of files under a folder, sorted; subfolders end with '/' unless recursive."""
    if is_gcs(path):
        bucket, key = split_gcs(path)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        it = gcs_client().list_blobs(bucket, prefix=prefix, delimiter=None if recursive else "/")
        names = [b.name[len(prefix) :] for b in it]
        names += [p[len(prefix) :] for p in getattr(it, "prefixes", ())]
        return sorted(n for n in names if n)
    if recursive:
        out = []
        for root, _, files in os.walk(path):
            rel = os.path.relpath(root, path)
            out += [f if rel == "." else os.path.join(rel, f) for f in files]
        return sorted(out)
    return sorted(n + "/" if os.path.isdir(os.path.join(path, n)) else n for n in os.listdir(path))


def cache_root() -> str:
    return os.environ.get(
        "POSTTRAIN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "posttrain")
    )


def download_dir(
    path: str, local_dir: str | None = None, *, allow_patterns: Sequence[str] | None = None
) -> str:
    """Copy the files under a gs:// folder to ``local_dir`` (default: the cache); returns the local folder.

    Files already present with the same size are kept, so a second call downloads nothing.
    Each file lands under a temporary name and is renamed, so an interrupted copy is not reused.
    """
    if not is_gcs(path):
        raise ValueError(f"download_dir needs a gs:// path, got {path!r}")
    bucket, key = split_gcs(path)
    local_dir = local_dir or os.path.join(cache_root(), "gcs", bucket, key.strip("/"))
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    blobs = list(gcs_client().list_blobs(bucket, prefix=prefix))
    if not blobs:
        raise FileNotFoundError(f"{path}: no files there")
    for blob in blobs:
        rel = blob.name[len(prefix) :]
        if not rel or rel.endswith("/"):
            continue
        if allow_patterns and not any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
            continue
        target = os.path.join(local_dir, rel)
        if os.path.exists(target) and os.path.getsize(target) == blob.size:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.partial-{os.getpid()}"
        blob.download_to_filename(tmp)
        os.replace(tmp, target)
    return local_dir


def upload_dir(local_dir: str, path: str) -> None:
    """Copy every file under ``local_dir`` to the gs:// folder ``path``."""
    for rel in list_dir(local_dir, recursive=True):
        _blob(join(path, rel)).upload_from_filename(os.path.join(local_dir, rel))


def local_path(path: str, *, allow_patterns: Sequence[str] | None = None) -> str:
    """A local folder holding ``path``'s files: itself, a gs:// download or an hf:// snapshot."""
    if is_gcs(path):
        return download_dir(path, allow_patterns=allow_patterns)
    if is_hf(path):
        from huggingface_hub import snapshot_download

        repo, _, revision = path[len(HF_PREFIX) :].partition("@")
        return snapshot_download(
            repo, revision=revision or None, allow_patterns=list(allow_patterns or []) or None
        )
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


@contextlib.contextmanager
def writable_dir(path: str) -> Iterator[str]:
    """A local folder to write into; for gs:// a temporary one uploaded to ``path`` on success."""
    if is_hf(path):
        raise ValueError(f"cannot write to {path!r}: hf:// is read-only here")
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="posttrain-upload-")
    try:
        yield tmp
        upload_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "download_dir",
    "exists",
    "gcs_client",
    "is_gcs",
    "is_hf",
    "join",
    "list_dir",
    "local_path",
    "open_file",
    "read_bytes",
    "read_text",
    "split_gcs",
    "upload_dir",
    "write_bytes",
    "write_text",
    "writable_dir",
]
