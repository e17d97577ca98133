"""The storage layer on local paths and file:// URIs; object-store URIs are only parsed."""

from __future__ import annotations

import pytest

from spatialrl import storage


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "checkpoint"
    (root / "lora" / "deep").mkdir(parents=True)
    (root / "lora" / "adapter.safetensors").write_bytes(bytes(range(256)) * 40)
    (root / "lora" / "deep" / "state.pt").write_bytes(b"\x00\xff" * 1000)
    (root / "run_state.json").write_text('{"iteration": 7}')
    return root


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_directory_round_trip_keeps_every_file_and_byte(tree, tmp_path, as_uri):
    remote = (tmp_path / "remote").as_uri() if as_uri else str(tmp_path / "remote")
    target = storage.join(remote, "runs", "iteration-000007")

    storage.upload_dir(tree, target)
    back = tmp_path / "back"
    storage.download_dir(target, back)

    expected = ["lora/adapter.safetensors", "lora/deep/state.pt", "run_state.json"]
    assert storage.list_files(target) == expected
    assert storage.list_files(back) == expected
    for name in expected:
        assert (back / name).read_bytes() == (tree / name).read_bytes()


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_upload_of_a_flat_directory_creates_the_target(tmp_path, as_uri):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "adapter.safetensors").write_bytes(b"weights")
    remote = tmp_path / "remote" / "iteration-000001" / "lora"
    storage.upload_dir(flat, remote.as_uri() if as_uri else str(remote))
    assert (remote / "adapter.safetensors").read_bytes() == b"weights"


def test_relative_paths_resolve_against_the_working_directory(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.upload_dir(tree, "relative/out")
    assert (tmp_path / "relative" / "out" / "run_state.json").read_text() == '{"iteration": 7}'
    assert storage.exists("relative/out/lora/deep/state.pt")


def test_exists_and_makedirs(tmp_path):
    target = storage.join(tmp_path.as_uri(), "a", "b")
    assert not storage.exists(target)
    storage.makedirs(target)
    storage.makedirs(target)  # a second call is a no-op
    assert storage.exists(target)
    assert (tmp_path / "a" / "b").is_dir()


def test_write_bytes_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = storage.join(str(tmp_path), "markers", "latest.json")
    storage.write_bytes(target, b'{"iteration": 1}')
    storage.write_bytes(target, b'{"iteration": 2}')
    assert storage.read_bytes(target) == b'{"iteration": 2}'
    assert sorted(p.name for p in (tmp_path / "markers").iterdir()) == ["latest.json"]


@pytest.mark.parametrize(
    "call",
    [
        lambda missing, _: storage.list_files(missing),
        lambda missing, _: storage.read_bytes(missing),
        lambda missing, tmp: storage.download_dir(missing, tmp / "out"),
        lambda missing, tmp: storage.upload_dir(missing, tmp / "out"),
    ],
    ids=["list_files", "read_bytes", "download_dir", "upload_dir"],
)
def test_missing_path_raises_file_not_found_naming_it(tmp_path, call):
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        call(missing, tmp_path)


def test_wrong_kind_of_entry_is_named(tree):
    with pytest.raises(NotADirectoryError, match="run_state.json"):
        storage.list_files(tree / "run_state.json")
    with pytest.raises(IsADirectoryError, match="lora"):
        storage.read_bytes(tree / "lora")


def test_join_keeps_scheme_bucket_and_query():
    assert storage.join("s3://bucket", "runs", "x.json") == "s3://bucket/runs/x.json"
    assert (
        storage.join("s3://bucket/runs?region=us-east-1", "ckpt")
        == "s3://bucket/runs/ckpt?region=us-east-1"
    )
    assert storage.join("gs://bucket/runs/", "ckpt") == "gs://bucket/runs/ckpt"
    assert storage.join("runs/local", "ckpt") == "runs/local/ckpt"


def test_s3_uri_resolves_to_the_s3_filesystem_without_network(monkeypatch):
    # An explicit region skips the bucket-region lookup, and with the EC2 metadata service
    # disabled the AWS SDK makes no request while building the client (checked with strace).
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    filesystem, path = storage.resolve("s3://bucket/runs/flux?region=us-east-1")
    assert filesystem.type_name == "s3"
    assert filesystem.region == "us-east-1"
    assert path == "bucket/runs/flux"


def test_staged_upload_to_a_local_path_writes_in_place(tmp_path):
    target = tmp_path / "run" / "learner"
    with storage.staged_upload(str(target)) as local:
        assert local == target and local.is_dir()  # no staging copy for a local path
        (local / "shard.pt").write_bytes(b"abc")
    assert (target / "shard.pt").read_bytes() == b"abc"


def test_staged_upload_to_a_uri_appears_only_when_the_block_ends(tmp_path):
    target = storage.join((tmp_path / "remote").as_uri(), "learner")
    with storage.staged_upload(target) as local:
        assert not str(local).startswith(str(tmp_path / "remote"))
        (local / "lora").mkdir()
        (local / "lora" / "adapter.safetensors").write_bytes(b"weights")
        assert not storage.exists(target)
    assert storage.list_files(target) == ["lora/adapter.safetensors"]
    assert not local.exists()  # the staging directory is gone


def test_staged_upload_uploads_nothing_after_an_error(tmp_path):
    target = (tmp_path / "remote").as_uri()
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.staged_upload(target) as local:
            (local / "half.pt").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert not storage.exists(target)
    assert not local.exists()


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_staged_download_gives_a_local_directory_with_every_file(tree, as_uri):
    location = tree.as_uri() if as_uri else str(tree)
    with storage.staged_download(location) as local:
        assert (local == tree) is not as_uri  # a local path is read in place
        assert (local / "lora" / "deep" / "state.pt").read_bytes() == b"\x00\xff" * 1000
    assert local.exists() is not as_uri  # only the staging copy is removed


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_staged_download_of_a_missing_directory_names_it(tmp_path, as_uri):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        with storage.staged_download(missing.as_uri() if as_uri else str(missing)):
            pass
