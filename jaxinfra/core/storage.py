"""The one module that knows URIs: local paths, `s3://bucket/prefix` and `gs://bucket/prefix` alike.

Files go through fsspec (s3fs, gcsfs: the clients Orbax's own `etils.epath` uses for the same URIs, so one client,
configured one way, serves both); arrays through TensorStore kvstore specs (ckpt/orbax_store.py). Object stores are
configured as their users already configure them: the standard AWS_* variables (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL
for S3-compatible stores such as MinIO, R2, Ceph; AWS_REGION, AWS_DEFAULT_REGION; AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY or AWS_PROFILE), and Google's application default credentials for gs://. No jaxinfra setting.

An object store has no atomic rename and no O_EXCL: a step is committed by Orbax's commit file (ckpt/orbax_store.py's
`atomicity`), a file appears whole by a single PUT, and `create_exclusive` is a conditional PUT (If-None-Match: *).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from jaxinfra.core.errors import UserError, one_line

SCHEMES = ("s3", "gs")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")  # S3's and GCS's common bucket-name rule
ATTEMPTS = 3  # client attempts per request of our own calls: their defaults retry for minutes
TIMEOUT_S = 8  # connect / read timeout of our own calls
_epath_endpoint: list[str | None] = [None]  # the S3 endpoint Orbax's epath was last pointed at


@dataclass(frozen=True)
class Location:
    """A parsed object-store URI."""

    scheme: str  # s3 or gs
    bucket: str
    key: str  # the prefix inside the bucket, no leading or trailing slash


def is_remote(path: str) -> bool:
    """Whether `path` names an object store (s3:// or gs://) rather than a local file."""
    return bool(re.match(r"^(s3|gs)://", str(path)))


def check(path: str, key: str) -> None:
    """A config value or argument that is a URI must be one this module can use (UserError naming `key`)."""
    if re.match(r"^(s3|gs):/?(?!/)", str(path)):  # s3:/x would pass for a local folder named s3:
        raise UserError(f"{key}={path}: malformed URI (write {str(path).split(':')[0]}://bucket/prefix)")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", str(path))
    if scheme and scheme.group(1) not in SCHEMES:
        raise UserError(f"{key}={path}: unknown storage scheme {scheme.group(1)}:// (use a local path, "
                        f"s3://bucket/prefix or gs://bucket/prefix)")
    if scheme:
        parse(path, key)


def parse(uri: str, key: str = "path") -> Location:
    """s3://bucket/prefix -> Location; UserError naming `key` for a malformed URI."""
    found = re.match(r"^(s3|gs)://([^/]*)/?(.*)$", uri)
    if not found:
        raise UserError(f"{key}={uri}: not an s3:// or gs:// URI")
    scheme, bucket, rest = found.groups()
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise UserError(f"{key}={uri}: '{bucket}' is not a valid bucket name (3 to 63 lowercase letters, "
                        f"digits, dots or dashes)")
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UserError(f"{key}={uri}: '.' and '..' are not allowed in an object key")
    return Location(scheme, bucket, "/".join(parts))


def join(base: str, *parts: str) -> str:
    """os.path.join for local paths and URIs alike."""
    if not is_remote(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts if p])


def basename(path: str) -> str:
    """The last component of a path or URI."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(os.path.normpath(path))


def dirname(path: str) -> str:
    """The folder a path or URI is in."""
    return str(path).rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(path))


def absolute(path: str) -> str:
    """An absolute local path, or the URI unchanged."""
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


# ---- settings: the standard environment, read here once per call (tests set it per server) ----

def s3_endpoint() -> str | None:
    """The S3 endpoint URL the AWS SDKs would use (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    """The AWS region the SDKs would use."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _fs(path: str) -> Any:
    """The fsspec filesystem of a URI (cached per scheme and endpoint), with bounded retries."""
    scheme, endpoint = parse(path).scheme, s3_endpoint()
    if scheme == "s3" and endpoint != _epath_endpoint[0]:
        _follow_endpoint(endpoint)
    return _filesystem(scheme, endpoint, s3_region())


def _follow_endpoint(endpoint: str | None) -> None:
    """Orbax opens s3:// through etils.epath, which keeps one s3fs per process (its lru_cache over
    fsspec's instance cache) built from the endpoint in the environment at first use: when the endpoint
    changes in a process, drop both, so Orbax's reads and writes go where ours do."""
    try:  # the cloud extra's clients: optional
        import s3fs
        from etils.epath import backend
    except ImportError:  # no cloud extra: _filesystem says so
        return
    backend.fsspec_backend._get_filesystem.cache_clear()
    s3fs.S3FileSystem.clear_instance_cache()
    _epath_endpoint[0] = endpoint


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, endpoint: str | None, region: str) -> Any:
    import fsspec  # the cloud extra's clients register with it: imported when a URI is first used
    try:
        if scheme == "gs":
            return fsspec.filesystem("gcs", timeout=TIMEOUT_S)
        return fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True,
                                 client_kwargs={"region_name": region},
                                 config_kwargs={"connect_timeout": TIMEOUT_S, "read_timeout": TIMEOUT_S,
                                                "retries": {"max_attempts": ATTEMPTS, "mode": "standard"}})
    except (ImportError, ValueError) as e:  # fsspec names the missing package
        raise UserError(f"{scheme}:// needs the cloud extra: pip install 'jaxinfra[cloud]' ({one_line(e, 120)})"
                        ) from None


def _key(path: str) -> str:
    loc = parse(path)
    return f"{loc.bucket}/{loc.key}" if loc.key else loc.bucket


def exists(path: str) -> bool:
    """Whether a file or folder exists."""
    return _fs(path).exists(_key(path)) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    """Whether a folder exists (on a store: whether any object has this prefix)."""
    if not is_remote(path):
        return os.path.isdir(path)
    with contextlib.suppress(FileNotFoundError):
        return bool(_fs(path).ls(_key(path), detail=False, refresh=True))
    return False


def isfile(path: str) -> bool:
    """Whether a file (object) exists."""
    return _fs(path).isfile(_key(path)) if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """Names directly inside a folder ([] if there is none)."""
    if not is_remote(path):
        return os.listdir(path) if os.path.isdir(path) else []
    with contextlib.suppress(FileNotFoundError):
        return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in _fs(path).ls(_key(path), detail=False, refresh=True)})
    return []


def walk_stamped(path: str) -> list[tuple[str, int, str]]:
    """(relative path, size, stamp) of every file under a folder, sorted by path (the stamp: see `stat`)."""
    if not is_remote(path):
        found = [(f, os.stat(f)) for root, _, names in os.walk(path) for f in (os.path.join(root, n) for n in names)]
        return sorted((os.path.relpath(f, path).replace(os.sep, "/"), st.st_size, str(st.st_mtime_ns))
                      for f, st in found)
    base, found = _key(path).rstrip("/") + "/", {}
    with contextlib.suppress(FileNotFoundError):
        found = _fs(path).find(base, detail=True)
    return sorted((k[len(base):], int(v.get("size") or 0), _stamp(v)) for k, v in found.items()
                  if v.get("type") != "directory")


def walk_files(path: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file under a folder, sorted by path."""
    return [(rel, n) for rel, n, _ in walk_stamped(path)]


def _stamp(info: dict) -> str:
    """A store's fingerprint of an object's content (ETag on S3, etag on GCS), else its mtime or MD5."""
    return next((str(info[k]).strip('"') for k in ("ETag", "etag", "mtime", "md5Hash") if info.get(k)), "")


def stat(path: str) -> tuple[int, str]:
    """(size, stamp) of a file; the stamp changes with its content: mtime in ns locally, the store's ETag."""
    if is_remote(path):
        info = _fs(path).info(_key(path))
        return int(info.get("size") or 0), _stamp(info)
    return (st := os.stat(path)).st_size, str(st.st_mtime_ns)


def size(path: str) -> int:
    """Bytes of a file."""
    return int(_fs(path).size(_key(path))) if is_remote(path) else os.path.getsize(path)


def open_read(path: str) -> BinaryIO:
    """A file opened for streaming reads (on a store: buffered ranged GETs, never the whole object at once)."""
    return _fs(path).open(_key(path), "rb") if is_remote(path) else open(path, "rb")


def read_bytes(path: str, start: int = 0, end: int | None = None) -> bytes:
    """A file's bytes, or the range [start, end) of them (a ranged GET on a store)."""
    if is_remote(path):
        return _fs(path).cat_file(_key(path), start=start or None, end=end)
    with open(path, "rb") as f:
        f.seek(start)
        return f.read() if end is None else f.read(end - start)


def read_text(path: str) -> str:
    """A text file."""
    return read_bytes(path).decode()


def write_bytes(path: str, data: bytes) -> None:
    """A whole file, appearing whole: one PUT on a store, a rename on a local disk."""
    if is_remote(path):
        _fs(path).pipe_file(_key(path), data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    """A whole text file (see write_bytes)."""
    write_bytes(path, text.encode())


def open_write(path: str) -> BinaryIO:
    """A file opened for streaming writes: a multipart upload on a store, of 5 MiB parts (S3's least: the client's
    buffer stays near that; the object appears only when the file is closed whole), a plain file locally."""
    if is_remote(path):
        return _fs(path).open(_key(path), "wb", block_size=5 << 20)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    return open(path, "wb")


def abort(f: BinaryIO) -> None:
    """Drop a streaming write without leaving an object (S3's multipart upload is aborted)."""
    (f.discard if hasattr(f, "discard") else f.close)()


def remove(path: str) -> None:
    """Delete a file if it exists."""
    if is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            _fs(path).rm_file(_key(path))
    elif os.path.lexists(path):
        os.remove(path)


def rmtree(path: str) -> None:
    """Delete a folder and everything in it, if it exists."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        _fs(path).rm(_key(path), recursive=True)


def move(src: str, dst: str) -> None:
    """Move a file or folder: a rename locally, copies then deletes on a store (not atomic there:
    callers only move folders whose commit marker is already in place)."""
    if not is_remote(src):
        os.rename(src, dst)
        return
    fs = _fs(src)
    if fs.isfile(_key(src)):
        fs.copy(_key(src), _key(dst))
        fs.rm_file(_key(src))
        return
    for rel, _ in walk_files(src):
        fs.copy(f"{_key(src)}/{rel}", f"{_key(dst)}/{rel}")
    rmtree(src)


def makedirs(path: str) -> None:
    """Create a local folder (a store needs none: prefixes exist once an object has them)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def create_exclusive(path: str, data: bytes) -> bool:
    """Create a file only if it does not exist (O_EXCL locally; a conditional PUT on a store:
    If-None-Match: * on S3, ifGenerationMatch=0 on GCS): True if this call created it."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    loc, fs = parse(path), _fs(path)
    if loc.scheme == "gs":  # gcsfs's mode="create" is the upload with ifGenerationMatch=0
        try:
            fs.pipe_file(_key(path), data, mode="create")
            return True
        except Exception as e:  # 412 Precondition Failed, in gcsfs's words
            if re.search(r"FileExistsError|PreconditionFailed|[Pp]recondition|\b412\b", f"{e!r} {e}"):
                return False
            raise
    try:
        fs.call_s3("put_object", Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")
        return True
    except Exception as e:  # s3fs turns 412 Precondition Failed into an OSError of the server's text
        if re.search(r"PreconditionFailed|ConditionalRequestConflict|pre-?conditions? .*not hold|\b412\b",
                     f"{e!r} {e}"):
            return False
        raise


def local_mirror(path: str) -> str:
    """The local folder that mirrors a remote run folder's small files (logs, plots, config)."""
    if not is_remote(path):
        return path
    loc = parse(path)
    return os.path.join(tempfile.gettempdir(), "jaxinfra-mirror", loc.scheme, loc.bucket, *loc.key.split("/"))


def upload(local: str, path: str) -> None:
    """Copy a local file to a path or URI (one PUT)."""
    if is_remote(path):
        _fs(path).put_file(local, _key(path))
    else:
        shutil.copyfile(local, path)


def download(path: str, local: str) -> None:
    """Copy a file from a path or URI to a local file."""
    os.makedirs(os.path.dirname(os.path.abspath(local)) or ".", exist_ok=True)
    if is_remote(path):
        _fs(path).get_file(_key(path), local)
    else:
        shutil.copyfile(path, local)


def reachable(path: str, key: str) -> None:
    """Before anything compiles: the bucket of a URI exists and answers with these credentials
    (UserError naming the URI and the cause, within about ATTEMPTS x TIMEOUT_S seconds)."""
    if not is_remote(path):
        return
    loc = parse(path, key)
    try:
        fs = _fs(path)
        if loc.scheme == "s3":
            fs.call_s3("head_bucket", Bucket=loc.bucket)
        else:
            fs.ls(loc.bucket, detail=False)
    except UserError:
        raise
    except Exception as e:  # the clients' errors, named by what the user can fix
        raise UserError(f"{key}={path}: {_cause(e, loc)}") from None


def _cause(e: BaseException, loc: Location) -> str:
    """What the user can fix, from a client's error (matched on the error's kind, not on the URL in it)."""
    text = re.sub(r"(https?|s3|gs)://\S+", "", f"{type(e).__name__}: {e}")
    if re.search(r"EndpointConnectionError|ConnectTimeout|Could not connect|timed out|Name or service|"
                 r"ClientConnectorError|Connection refused", text):
        return f"cannot reach the endpoint {s3_endpoint() or 'of ' + loc.scheme} ({one_line(e, 120)})"
    if re.search(r"NoSuchBucket|\b404\b|Not Found|FileNotFoundError", text):
        return f"bucket {loc.bucket} does not exist"
    if re.search(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|\b40[13]\b|Forbidden|NoCredentials|"
                 r"Unable to locate credentials|PermissionError|Unauthorized", text):
        fix = "; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE" if loc.scheme == "s3" else ""
        return f"the credentials were refused ({one_line(e, 120)}){fix}"
    return one_line(e, 200)


def must_exist(path: str, key: str, what: str) -> None:
    """A config value naming something to read: a valid, reachable URI or path that exists (UserError
    `key=path: no such <what>` otherwise)."""
    check(path, key)
    reachable(path, key)
    if not exists(path) and not isdir(path):
        raise UserError(f"{key}={path}: no such {what}")


