"""One filesystem API for checkpoints and artifacts on a local path, s3:// or gs://.

Every function takes a location as a string: a local path (relative or absolute), a
`file://` URI, or an object-store URI such as `s3://bucket/runs/x` or `gs://bucket/runs/x`.
pyarrow's filesystems (`pyarrow.fs.FileSystem.from_uri`) do the work; S3 credentials and
region come from the usual AWS environment (AWS_ACCESS_KEY_ID, AWS_REGION, an instance
role, ...) and GCS's from Application Default Credentials. Options go in the URI's query:
`s3://bucket/runs?region=us-west-2` skips the bucket-region lookup (one request at open),
`s3://bucket/runs?endpoint_override=minio:9000&scheme=http` reaches a MinIO server.

What is atomic:
- `write_bytes` on a local path (and HDFS) writes a temporary sibling, then renames it over
  the target, so a reader sees the old or the new file, never half of one. On S3 and GCS a
  single-object upload already has that property (the object appears when the upload
  completes), and a rename would be a second full copy, so the file is written in place.
- `upload_dir` is not atomic anywhere: a crash leaves some files copied. Write a small marker
  file with `write_bytes` after the upload and treat a directory without it as incomplete.

Code that can only write or read a local directory (DeepSpeed, diffusers) goes through
`staged_upload` and `staged_download`: a local path is used as it is, with no copy; any URI,
file:// included, is staged in a temporary local directory ($TMPDIR) and copied.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

# Filesystems whose rename replaces the target in one step. They are also the ones with real
# directories, which must exist before a file is written into them (object stores have none).
ATOMIC_RENAME = {"local", "hdfs"}
CHUNK_BYTES = 1 << 20


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in os.fspath(location)


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `location` and the path inside it."""
    location = os.fspath(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    return pafs.FileSystem.from_uri(location)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base` with path parts appended; a URI keeps its scheme, bucket and query."""
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    split = urlsplit(base)
    return urlunsplit(split._replace(path=posixpath.join(split.path or "/", *parts)))


def _info(location: str | os.PathLike) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    filesystem, path = resolve(location)
    return filesystem, path, filesystem.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return _info(location)[2].type != pafs.FileType.NotFound


def makedirs(location: str | os.PathLike) -> None:
    """Create a directory and its parents; nothing happens if it exists."""
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)


def _require(info: pafs.FileInfo, location: str | os.PathLike, kind: pafs.FileType) -> None:
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {os.fspath(location)}")
    if info.type != kind:
        what = "directory" if kind == pafs.FileType.Directory else "file"
        raise (NotADirectoryError if what == "directory" else IsADirectoryError)(
            f"not a {what}: {os.fspath(location)}"
        )


def list_files(location: str | os.PathLike) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of every file below a directory."""
    filesystem, path, info = _info(location)
    _require(info, location, pafs.FileType.Directory)
    found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    root = path.rstrip("/") + "/"
    return sorted(f.path.removeprefix(root) for f in found if f.type == pafs.FileType.File)


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy every file below a local directory to `location` (directories made as needed)."""
    source = Path(local_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"no such local directory to upload: {local_dir}")
    filesystem, path = resolve(location)
    if filesystem.type_name in ATOMIC_RENAME:  # copy_files makes only the subdirectories
        filesystem.create_dir(path, recursive=True)
    pafs.copy_files(str(source), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=filesystem)


def download_dir(location: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy every file below `location` into a local directory (created if missing)."""
    filesystem, path, info = _info(location)
    _require(info, location, pafs.FileType.Directory)
    target = Path(local_dir).resolve()
    target.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())


@contextmanager
def staged_upload(location: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write the files of `location` into: a local path itself (created
    if missing); for a URI a temporary directory, uploaded to `location` when the block ends
    without an error and removed in any case."""
    if not is_uri(location):
        local = Path(os.path.abspath(location))
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="spatialrl-upload-") as staging:
        yield Path(staging)
        upload_dir(staging, location)


@contextmanager
def staged_download(location: str | os.PathLike) -> Iterator[Path]:
    """A local directory holding the files of the directory `location`: a local path itself;
    for a URI a temporary copy, removed when the block ends."""
    if not is_uri(location):
        _require(_info(location)[2], location, pafs.FileType.Directory)
        yield Path(os.path.abspath(location))
        return
    with tempfile.TemporaryDirectory(prefix="spatialrl-download-") as staging:
        download_dir(location, staging)
        yield Path(staging)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a small file; readers never see a partial one (see the module notes)."""
    filesystem, path = resolve(location)
    if filesystem.type_name not in ATOMIC_RENAME:  # object stores: no directories to make
        with filesystem.open_output_stream(path) as out:
            out.write(data)
        return
    filesystem.create_dir(posixpath.dirname(path), recursive=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with filesystem.open_output_stream(temporary) as out:
            out.write(data)
        filesystem.move(temporary, path)
    except BaseException:
        if filesystem.get_file_info(temporary).type != pafs.FileType.NotFound:
            filesystem.delete_file(temporary)
        raise


def sha256(location: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read as a stream."""
    filesystem, path, info = _info(location)
    _require(info, location, pafs.FileType.File)
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_bytes(location: str | os.PathLike) -> bytes:
    filesystem, path, info = _info(location)
    _require(info, location, pafs.FileType.File)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()
