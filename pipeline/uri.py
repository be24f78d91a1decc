"""Storage locations: a local path or a ``scheme://`` URI, through one small set of helpers.

A *location* is a string: a local path (``/data/store``, ``work/store``, ``file:///data/store``)
or a pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://bucket/prefix``, with an optional
``?query`` such as ``?endpoint_override=localhost:9000``). Local paths are made absolute (Ray
workers run in other working directories). ``s3://`` and ``gs://`` filesystems are built with
short timeouts and few retries (a store without credentials or network must fail in seconds, not
after pyarrow's ~15 minutes of retries), with the usual credential sources of pyarrow's clients
(``AWS_*``, ``AWS_ENDPOINT_URL`` for S3-compatible servers, ``GOOGLE_APPLICATION_CREDENTIALS``);
a URI with a ``?query`` and any other scheme go through ``pyarrow.fs.FileSystem.from_uri``. This is
the one module that turns locations into filesystems: the artifact store, the training package
and the data feeds all use it.

    >>> join("s3://bucket/store?region=eu-west-1", "_train", "run")
    's3://bucket/store/_train/run?region=eu-west-1'
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = [
    "copy_dir_from_local",
    "copy_dir_to_local",
    "filesystem",
    "is_local",
    "join",
    "local_copy",
    "local_path",
    "missing_credentials_hint",
    "read_bytes",
]


def is_local(uri: str) -> bool:
    """True for a local path or a ``file://`` URI; False for any other ``scheme://`` URI."""
    return "://" not in str(uri) or str(uri).startswith("file://")


def local_path(uri: str) -> Path:
    """The absolute local path of a local location (``file://`` prefix removed).

    Raises:
        ValueError: ``uri`` is a remote URI (``s3://``, ``gs://``, ...).
    """
    uri = str(uri)
    if not is_local(uri):
        raise ValueError(f"{uri!r} is not a local path")
    return Path(uri.removeprefix("file://")).expanduser().resolve()


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?")
    return base, (sep + query)


def join(base: str, *parts: str) -> str:
    """``base`` / ``parts``: an absolute local path string for a local ``base``, else a URI with
    ``base``'s scheme and ``?query`` (kept at the end)."""
    base = str(base)
    if is_local(base):
        return str(local_path(base).joinpath(*parts))
    root, query = _split_query(base)
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)]) + query


def filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path in it)`` for a location.

    Local: ``LocalFileSystem`` and the absolute path. Remote: ``FileSystem.from_uri(uri)`` (the
    path without scheme or trailing ``/``; e.g. ``bucket/prefix`` for ``s3://bucket/prefix``).

    Raises:
        pyarrow.lib.ArrowInvalid / OSError: an unknown scheme or a filesystem that cannot be
            created (e.g. an S3 region lookup without network).
    """
    import pyarrow.fs as pafs

    if is_local(uri):
        return pafs.LocalFileSystem(), str(local_path(uri))
    if "?" not in uri and uri.partition("://")[0] in ("s3", "gs", "gcs"):
        fs, path = _remote_filesystem(uri)
        return fs, path.rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


@functools.lru_cache(maxsize=16)
def _cached_filesystem(root: str) -> tuple[Any, str]:
    return filesystem(root)


def read_bytes(uri: str) -> bytes:
    """The bytes of the file at a location (a worker reading an image, a label, an array).

    Raises:
        OSError: the file cannot be read (FileNotFoundError when it does not exist).
    """
    if is_local(uri):
        with open(local_path(uri), "rb") as f:
            return f.read()
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    fs, root = _cached_filesystem(f"{scheme}://{bucket}")  # one client per bucket, not per folder
    with fs.open_input_stream(f"{root}/{key}" if root else key) as f:
        return f.read()


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local directory with the files of the directory at ``uri``: itself when local, else a
    temporary download removed when the context ends (a worker on any node reading a small
    artifact: a checkpoint, a segmenter).

    Raises:
        FileNotFoundError / OSError: ``uri`` does not exist or cannot be read.
    """
    if is_local(uri):
        yield local_path(uri)
        return
    tmp = tempfile.mkdtemp(prefix="zeroseg-copy-")
    try:
        yield copy_dir_to_local(uri, Path(tmp) / "copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _aws_credential_sources() -> list[str]:
    env = os.environ
    found = [
        k
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        )
        if env.get(k)
    ]
    for f in (
        env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
        env.get("AWS_CONFIG_FILE") or "~/.aws/config",
    ):
        if Path(f).expanduser().is_file():
            found.append(f)
    return found


def _gcp_credential_sources() -> list[str]:
    env = os.environ
    found = [k for k in ("GOOGLE_APPLICATION_CREDENTIALS",) if env.get(k)]
    adc = Path(env.get("CLOUDSDK_CONFIG") or "~/.config/gcloud").expanduser() / "application_default_credentials.json"
    if adc.is_file():
        found.append(str(adc))
    return found


def _remote_filesystem(uri: str) -> tuple[Any, str]:
    """``(filesystem, path)`` for an object-store URI, built with short timeouts so that a store
    without credentials or network fails in seconds (pyarrow's defaults retry for ~15 minutes)."""
    import pyarrow.fs as pafs

    scheme, _, rest = uri.partition("://")
    path = rest.strip("/")
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw: dict[str, Any] = dict(
            connect_timeout=5, request_timeout=20, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3)
        )
        if endpoint:
            ep_scheme, sep, host = endpoint.partition("://")
            kw.update(endpoint_override=host if sep else endpoint, scheme=ep_scheme if sep else "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        elif not endpoint:
            with contextlib.suppress(Exception):
                kw["region"] = pafs.resolve_s3_region(path.split("/", 1)[0])
        return pafs.S3FileSystem(**kw), path
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=8)), path
    fs, p = pafs.FileSystem.from_uri(uri)
    return fs, p


def missing_credentials_hint(uri: str) -> str:
    """What to check when the store at ``uri`` cannot be reached: the credential sources found,
    or the ones that are missing."""
    scheme = uri.partition("://")[0]
    if scheme == "s3":
        have = _aws_credential_sources()
        if have:
            return (
                f"credentials were found in {', '.join(have)}; check them, the bucket name, AWS_REGION and the network"
            )
        return (
            "no AWS credentials were found (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "~/.aws/credentials, or an instance role); set them (AWS_ENDPOINT_URL for MinIO or another "
            "S3-compatible server) on every node"
        )
    if scheme in ("gs", "gcs"):
        have = _gcp_credential_sources()
        if have:
            return f"credentials were found in {', '.join(have)}; check them, the bucket name and the network"
        return (
            "no Google Cloud credentials were found (GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth "
            "application-default login`); set them on every node"
        )
    return "check the URI, credentials and network"


def copy_dir_to_local(uri: str, dest: str | Path) -> Path:
    """Copy the directory at ``uri`` (its files and subdirectories) into ``dest``, replacing
    ``dest`` if it exists. Returns ``dest``.

    Raises:
        FileNotFoundError / OSError: ``uri`` does not exist or cannot be read.
    """
    import pyarrow.fs as pafs

    dest = Path(dest)
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no directory at {uri}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def copy_dir_from_local(src: str | Path, uri: str, last: str | None = None) -> None:
    """Copy the local directory ``src`` to ``uri``, replacing what is there.

    Args:
        src: a local directory (files and subdirectories are copied).
        uri: the destination directory (created with its parents).
        last: a file name in ``src`` copied after every other file (a completion marker: a
            reader that finds it knows the rest is there).

    Raises:
        OSError: the destination cannot be written.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    local = pafs.LocalFileSystem()
    for p in sorted(Path(src).iterdir(), key=lambda p: p.name == last):
        if p.is_dir():
            fs.create_dir(f"{path}/{p.name}", recursive=True)
        pafs.copy_files(str(p), f"{path}/{p.name}", source_filesystem=local, destination_filesystem=fs)
