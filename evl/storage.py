"""Every file the project reads or writes, on local disk or in an object store.

A path is a local path or a URI of a pyarrow filesystem: `s3://bucket/key`, `gs://bucket/key`,
`file:///abs/path`, or any other scheme `pyarrow.fs.FileSystem.from_uri` knows. URIs are used verbatim (no
percent-decoding), so keys with spaces work as long as they are written as is. Nothing else in the project
parses a URI: it calls `join`, `parent`, `absolute` and the readers and writers here.

S3 and S3-compatible stores (MinIO, Ceph, on-premises): the endpoint comes from `AWS_ENDPOINT_URL` when set,
credentials from the usual AWS chain (environment, `~/.aws`, the instance role). Throttling (503 SlowDown) and
dropped connections are retried by the AWS SDK's standard strategy with exponential backoff, `S3_ATTEMPTS`
tries in all per request; a read or write cut short in a way the SDK does not retry (a connection reset while
a response streams) is tried again whole, `OPERATION_ATTEMPTS` times. What still fails raises a `StorageError`
that names the URI, on one line.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_BUCKET_SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs"}  # pyarrow addresses these as "bucket/key"
S3_ATTEMPTS = 5  # per request; the SDK's backoff between them adds up to about 10 s, enough for throttling to ease
S3_CONNECT_TIMEOUT_S = 10.0
OPERATION_ATTEMPTS = 4  # whole-operation tries, for what the SDK gives up on (a connection dropped mid-response)
CACHE_ENV = "EVL_CACHE_DIR"  # where `local_copy` keeps objects fetched from a store (default ~/.cache/evl)


class StorageError(OSError):
    """A file that cannot be read or written; the message names it and says why, on one line."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # Ray ships errors across processes
        return type(self), (self.path, self.reason)


class NotFound(StorageError, FileNotFoundError):
    """The file does not exist."""


@dataclass(frozen=True)
class Entry:
    """One item of a folder listing."""

    path: str  # in the caller's form: a URI under a URI root, a local path under a local one
    name: str
    is_dir: bool
    size: int
    mtime_ns: int


# --------------------------------------------------------------------------------------------------------------
# Names


def is_uri(path: str) -> bool:
    return bool(_URI.match(str(path)))


def local_path(path: str) -> str | None:
    """The path on this machine's disk for a local path or a file:// URI (absolute); None for a store's."""
    path = str(path)
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(root: str, *parts: str) -> str:
    """`root`/`parts`, with '/' under a URI and the OS's separator under a local path."""
    root = str(root)
    if is_uri(root):
        return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts if p])
    return os.path.join(root, *parts)


def parent(path: str) -> str:
    """The folder holding `path` (a URI's stays a URI; a local one is made absolute)."""
    path = str(path)
    if is_uri(path):
        scheme, rest = path.split("://", 1)
        rest = rest.rstrip("/")
        return f"{scheme}://{rest.rsplit('/', 1)[0]}" if "/" in rest else f"{scheme}://{rest}"
    return os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
    path = str(path)
    return path.rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else os.path.basename(path)


def absolute(path: str | None, root: str | None = None) -> str | None:
    """A URI as it is; a local path made absolute against `root` (default: the current directory)."""
    if not path or is_uri(path):
        return path
    return os.path.abspath(os.path.join(root or os.getcwd(), os.path.expanduser(path)))


def is_absolute(path: str) -> bool:
    """A URI or an absolute local path: where it points does not depend on the current directory."""
    return is_uri(path) or os.path.isabs(os.path.expanduser(str(path)))


def relative(path: str, root: str) -> str:
    """`path` relative to the folder `root`, with '/' separators; ValueError if it is not under it."""
    path, root = str(path), str(root)
    if is_uri(path) != is_uri(root):
        raise ValueError(f"{path} is not under {root}")
    if is_uri(path):
        prefix = root.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise ValueError(f"{path} is not under {root}")
        return path[len(prefix):]
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise ValueError(f"{path} is not under {root}")
    return rel.replace(os.sep, "/")


def comparable(path: str) -> str:
    """One spelling per location, to compare two paths: real local paths (file:// URIs too), else the URI
    without a trailing '/'."""
    local = local_path(path)
    if local is None:
        return str(path).rstrip("/")
    return os.path.realpath(local).rstrip("/") or "/"


# --------------------------------------------------------------------------------------------------------------
# Filesystems


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """One filesystem per bucket: building an S3 one resolves the bucket's region over the network."""
    fs = pafs.FileSystem.from_uri(f"{scheme}://{bucket}/")[0]
    if isinstance(fs, pafs.S3FileSystem):  # the same store (from_uri read AWS_ENDPOINT_URL), with our retries
        options = fs.__reduce__()[1][0]
        fs = pafs.S3FileSystem(region=fs.region, endpoint_override=options["endpoint_override"] or None,
                               scheme=options["scheme"], connect_timeout=S3_CONNECT_TIMEOUT_S,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))
    return fs


# atexit runs handlers last-registered first: the cached clients go before pyarrow's S3 finalizer (registered
# when pyarrow.fs was imported) shuts the AWS SDK down; a client destroyed after it aborts the process.
atexit.register(_bucket_filesystem.cache_clear)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    scheme, rest = path.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    try:
        if scheme in _BUCKET_SCHEMES and "?" not in rest:
            bucket = rest.split("/", 1)[0]
            if not bucket:
                raise ValueError("no bucket in the URI")
            return _bucket_filesystem(_BUCKET_SCHEMES[scheme], bucket), rest.rstrip("/")
        return pafs.FileSystem.from_uri(path)
    except (OSError, ValueError, TypeError) as e:  # unknown scheme, unreachable endpoint, no region
        raise StorageError(path, f"cannot open its filesystem: {_one_line(e)}") from None


def uri_of(fs: pafs.FileSystem, inner: str) -> str:
    """The path a user can paste for `inner` on `fs` (e.g. a Ray checkpoint's `filesystem` and `path`)."""
    kind = fs.type_name
    if kind == "local":
        return inner
    if kind == "s3":
        return f"s3://{inner}"
    if kind == "gcs":
        return f"gs://{inner}"
    if kind == "subtree" or kind == "py":
        raise ValueError(f"no URI for a path on a {kind} filesystem")
    return f"{kind}://{inner}"


def filesystem_for_ray(path: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a store's filesystem, with this module's
    retries, and the path inside it; a local path as it is (Ray opens those itself)."""
    local = local_path(path)
    if local is not None:
        return local, None
    fs, inner = resolve(path)
    return inner, fs


# --------------------------------------------------------------------------------------------------------------
# Reading


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


# What the AWS SDK reports, and does not retry, when a connection drops mid-response; a retry of the whole
# operation (each is idempotent: a whole-object read or write, a listing) gets through.
_DROPPED = ("INTERNAL_FAILURE", "Failed to flush response stream", "Connection reset", "curlCode: 52",
            "curlCode: 55", "curlCode: 56", "SlowDown", "InternalError", "RequestTimeout")


def _do(path: str, doing: str, fs: pafs.FileSystem, operation):
    """`operation()`, its errors raised as StorageError naming `path`; on a store, an operation cut short by a
    dropped connection is tried again (`OPERATION_ATTEMPTS` in all, with backoff)."""
    for attempt in range(OPERATION_ATTEMPTS):
        try:
            return operation()
        except StorageError:
            raise
        except FileNotFoundError:
            raise NotFound(path, "does not exist") from None
        except IsADirectoryError:
            raise StorageError(path, "is a folder, not a file") from None
        except OSError as e:
            text = _one_line(e)
            if "Path does not exist" in text or "NoSuchKey" in text or "No such file" in text:
                raise NotFound(path, "does not exist") from None
            dropped = not isinstance(fs, pafs.LocalFileSystem) and any(m in text for m in _DROPPED)
            if not dropped or attempt == OPERATION_ATTEMPTS - 1:
                raise StorageError(path, f"cannot {doing}: {text}") from None
        time.sleep(0.25 * 2 ** attempt)


def info(path: str) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return _do(path, "look it up", fs, lambda: fs.get_file_info(inner))


def exists(path: str) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path: str) -> bool:
    return info(path).type == pafs.FileType.Directory


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)

    def read() -> bytes:
        # A random-access file knows its size from the one HEAD that opens it, so read() is a single GET (a
        # stream of unknown size takes one GET per 256 KiB: bench/README.md).
        try:
            f = fs.open_input_file(inner)
        except OSError:
            if fs.get_file_info(inner).type == pafs.FileType.Directory:  # only now: it costs a request
                raise IsADirectoryError(inner) from None
            raise
        with f:
            return f.read()

    return _do(path, "read it", fs, read)


def read_text(path: str) -> str:
    """The file's text (UTF-8, a byte-order mark dropped)."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StorageError(path, f"is not UTF-8 text ({e.reason} at byte {e.start})") from None


def open_input(path: str):
    """A random-access file (read, seek, tell, size): readers that jump around fetch only the ranges they read."""
    fs, inner = resolve(path)
    return _do(path, "open it", fs, lambda: fs.open_input_file(inner))


def list_dir(path: str) -> list[Entry]:
    """The folder's entries (an empty list when it does not exist), each with its path in the caller's form."""
    fs, inner = resolve(path)
    infos = _do(path, "list it", fs, lambda: fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)))
    return [_entry(path, inner, i) for i in infos]


def walk(root: str) -> Iterator[Entry]:
    """Every file under `root`, at any depth."""
    fs, inner = resolve(root)
    selector = pafs.FileSelector(inner, recursive=True, allow_not_found=True)
    infos = _do(root, "list it", fs, lambda: fs.get_file_info(selector))
    for i in infos:
        if i.type == pafs.FileType.File:
            yield _entry(root, inner, i)


def _entry(root: str, inner_root: str, i: pafs.FileInfo) -> Entry:
    rel = i.path[len(inner_root.rstrip("/")):].lstrip("/")
    path = join(root, *rel.split("/")) if is_uri(root) else os.path.join(os.path.abspath(root), *rel.split("/"))
    return Entry(path=path, name=i.base_name, is_dir=i.type == pafs.FileType.Directory, size=i.size or 0,
                 mtime_ns=i.mtime_ns or 0)


# --------------------------------------------------------------------------------------------------------------
# Writing


def write_bytes(path: str, data: bytes) -> None:
    """Write the whole file at once, never leaving a partial one under its name: a local file is written beside
    it and renamed; an object store publishes an object only when its upload completes."""
    fs, inner = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        _do(path, "write it", fs, lambda: _write_local(inner, data))
        return

    def upload() -> None:
        # (no create_dir: a store has no folders, and pyarrow would write empty marker objects for them)
        with fs.open_output_stream(inner) as stream:  # the upload completes, and its errors surface, on close
            stream.write(data)

    _do(path, "write it", fs, upload)


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def upload_file(local: str, path: str) -> None:
    """Copy the local file `local` to `path` (a URI or a local path), as write_bytes does."""
    if not is_uri(path):
        with open(local, "rb") as f:
            write_bytes(path, f.read())
        return
    fs, inner = resolve(path)
    _do(path, "write it", fs, lambda: pafs.copy_files(local, inner, source_filesystem=pafs.LocalFileSystem(),
                                                      destination_filesystem=fs))


# --------------------------------------------------------------------------------------------------------------
# Local copies


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "evl")


def local_copy(path: str) -> str:
    """A local file with `path`'s content: a local path itself; an object fetched once per machine into the
    cache (`$EVL_CACHE_DIR`, default ~/.cache/evl) and fetched again only when the object's size or time
    changes. Files of one folder land in one cache folder, so a file's neighbours (a config beside weights)
    are neighbours in the cache too. Concurrent callers on one machine download it once."""
    path = str(path)
    local = local_path(path)
    if local is not None:
        if not os.path.isfile(local):
            raise NotFound(path, "does not exist" if not os.path.exists(local) else "is not a file")
        return local
    found = info(path)
    if found.type != pafs.FileType.File:
        raise NotFound(path, "does not exist" if found.type == pafs.FileType.NotFound else "is not a file")
    folder = os.path.join(cache_dir(), "objects", hashlib.sha256(parent(path).encode()).hexdigest()[:20])
    os.makedirs(folder, exist_ok=True)
    local = os.path.join(folder, basename(path))
    stamp = f"{path}\n{found.size}\n{found.mtime_ns or 0}\n"
    with _lock(local + ".lock"):
        if os.path.isfile(local) and _read_local(local + ".source") == stamp:
            return local
        fs, inner = resolve(path)

        def download() -> None:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".download.")
            os.close(fd)
            try:
                pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
                if os.path.getsize(tmp) != found.size:
                    raise OSError(f"Connection reset: downloaded {os.path.getsize(tmp)} of {found.size} bytes")
                os.replace(tmp, local)
            finally:
                with contextlib.suppress(OSError):
                    os.remove(tmp)

        _do(path, "download it", fs, download)
        with open(local + ".source", "w") as f:
            f.write(stamp)
    return local


def _read_local(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


@contextlib.contextmanager
def _lock(path: str):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
