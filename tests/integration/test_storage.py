"""Artifacts on a real S3-compatible server (moto, 127.0.0.1) and in a local folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from shipyard.runtime.local import free_port
from shipyard.serve.export import export_folder
from shipyard.storage import (
    MANIFEST,
    ChecksumError,
    StorageError,
    download_folder,
    from_ray_storage,
    latest,
    mirrored_file,
    open_store,
    publish,
    pull,
    ray_storage,
    remove_folder,
    versions,
)
from shipyard.train.checkpoint import METADATA_FILE, SavedCheckpoint, local_copy
from tests.conftest import start_moto_server

pytestmark = pytest.mark.integration


def artifact(folder: Path, text: str) -> Path:
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "model.bin").write_bytes(text.encode() * 1000)
    (folder / "model.json").write_text(f'{{"note": "{text}"}}')
    return folder


@pytest.mark.parametrize("where", ["s3", "local"])
def test_the_latest_complete_version_is_pulled_and_verified(where, request, tmp_path):
    uri = request.getfixturevalue("s3") + "/team/a" if where == "s3" else tmp_path / "store"
    store = open_store(uri)
    store.check()
    assert latest(store, "tiny") is None
    first = publish(store, "tiny", artifact(tmp_path / "one", "first"), {"step": 50})
    second = publish(store, "tiny", artifact(tmp_path / "two", "second"), {"step": 100})
    assert [m.version for m in versions(store, "tiny")] == [first.version, second.version]
    assert latest(store, "tiny") == second and second.metadata == {"step": 100}

    pulled = pull(store, second, tmp_path / "pulled")
    assert (pulled / "weights" / "model.bin").read_bytes() == b"second" * 1000
    assert (pulled / "model.json").read_text() == '{"note": "second"}'
    with pytest.raises(StorageError, match="already exists; it is left as it is"):
        pull(store, second, tmp_path / "pulled")


def test_a_corrupted_object_is_caught_and_nothing_is_left_behind(s3, tmp_path):
    store = open_store(s3)
    manifest = publish(store, "tiny", artifact(tmp_path / "one", "first"))
    bucket = s3.removeprefix("s3://")
    key = f"tiny/{manifest.version}/model.json"
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b'{"note": "tampered"}')
    with pytest.raises(ChecksumError, match=r"model\.json: its SHA-256 differs"):
        pull(store, manifest, tmp_path / "pulled")
    assert list((tmp_path / "pulled").iterdir()) == [], "no half-checked folder is handed over"


HOSTILE_PATHS = ["../escaped.txt", "/tmp/shipyard-escaped.txt", "a//escaped.txt", "./x", "a\\b"]


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_hostile_manifest_writes_nothing_outside_the_target(where, request, tmp_path):
    """Whoever can write the store decides the manifest: its paths and version must never
    place a file outside the folder pulled into, and corrupt JSON is a clear error."""
    uri = request.getfixturevalue("s3") if where == "s3" else tmp_path / "store"
    store = open_store(uri)
    good = publish(store, "tiny", artifact(tmp_path / "one", "first"))
    manifest_key = f"tiny/{good.version}/{MANIFEST}"
    pulled = tmp_path / "inside" / "pulled"
    for hostile in HOSTILE_PATHS:
        files = {hostile: {"bytes": 6, "sha256": "0" * 64}}
        store.put_text(manifest_key, json.dumps({**good.__dict__, "files": files}))
        with pytest.raises(StorageError, match="not a relative path inside the folder"):
            pull(store, latest(store, "tiny"), pulled)
    for version in ["../x", "a/b", ".."]:
        store.put_text("tiny/latest", json.dumps({"version": version}))
        with pytest.raises(StorageError, match="tiny/latest"):
            latest(store, "tiny")
    store.put_text(manifest_key, '{"name": "tiny", "version": ')
    with pytest.raises(StorageError, match=rf"{MANIFEST}: not a JSON object"):
        versions(store, "tiny")
    store.put_text("tiny/latest", "[]")
    with pytest.raises(StorageError, match="tiny/latest: not a JSON object"):
        latest(store, "tiny")
    assert not (tmp_path / "inside" / "escaped.txt").exists()
    assert not Path("/tmp/shipyard-escaped.txt").exists()
    assert not pulled.exists() or list(pulled.iterdir()) == []


def test_an_s3_key_with_an_empty_segment_is_not_downloaded_outside(s3, tmp_path):
    """`prefix//etc/x` minus `prefix/` is `/etc/x`: joined onto a folder it is absolute."""
    bucket = s3.removeprefix("s3://")
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="ckpt/ok.txt", Body=b"fine")
    client.put_object(Bucket=bucket, Key="ckpt//tmp/shipyard-escaped-key.txt", Body=b"x")
    with pytest.raises(StorageError, match="not a relative path inside the folder"):
        download_folder(open_store(s3), "ckpt", tmp_path / "target")
    assert not Path("/tmp/shipyard-escaped-key.txt").exists()
    assert not (tmp_path / "target").exists()
    assert [p.name for p in tmp_path.iterdir()] == [], "the staging folder is gone too"


UPLOAD = """
import sys
from pathlib import Path
from shipyard.storage import open_store, publish
publish(open_store(sys.argv[1]), "big", Path(sys.argv[2]))
"""


def test_an_upload_killed_halfway_leaves_the_old_latest(s3, tmp_path):
    store = open_store(s3)
    old = publish(store, "big", artifact(tmp_path / "old", "old"))
    big = tmp_path / "new"
    big.mkdir()
    (big / "model.bin").write_bytes(os.urandom(80 * 1024**2))  # 5 parts of 16 MiB
    uploader = subprocess.Popen([sys.executable, "-c", UPLOAD, s3, str(big)])
    client, bucket = boto3.client("s3"), s3.removeprefix("s3://")
    deadline = time.monotonic() + 120
    while not _parts_uploaded(client, bucket):  # kill it once the multipart upload is under way
        assert uploader.poll() is None, "the upload finished before it could be interrupted"
        assert time.monotonic() < deadline, "no multipart upload was seen"
        time.sleep(0.05)
    uploader.send_signal(signal.SIGKILL)
    uploader.wait()

    assert latest(store, "big") == old
    assert versions(store, "big") == [old], "the cut version has no manifest"
    pulled = pull(store, latest(store, "big"), tmp_path / "pulled")
    assert (pulled / "model.json").read_text() == '{"note": "old"}'


def _parts_uploaded(client, bucket: str) -> bool:
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        parts = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        if parts.get("Parts"):
            return True
    return False


def test_unusable_storage_is_a_clear_error_before_anything_is_written(s3, tmp_path, monkeypatch):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/x").check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match=r"cannot reach S3 .*AWS_ENDPOINT_URL"):
        open_store(s3).check()
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="cannot write there"):
        open_store(tmp_path / "file" / "store").check()


def test_refused_credentials_are_a_clear_error(tmp_path, monkeypatch):
    # A server that checks signatures and policies against its own IAM users; its first three
    # calls go unchecked, to make a bucket and a user that no policy allows anything.
    server, url = start_moto_server(tmp_path / "moto.log", INITIAL_NO_AUTH_ACTION_COUNT="3")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        admin = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", **admin).create_bucket(Bucket="a-bucket")
        boto3.client("iam", **admin).create_user(UserName="reader")
        key = boto3.client("iam", **admin).create_access_key(UserName="reader")["AccessKey"]

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(StorageError, match="credentials were refused"):
            open_store("s3://a-bucket").check()
        with pytest.raises(StorageError, match=r"a-bucket/x.json: .*credentials were refused"):
            open_store("s3://a-bucket").get_text("x.json")
        # S3 answers 403, not 404, for a missing key that the caller may not list or read.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(StorageError, match=r"s3://a-bucket/gone.json: S3 refused access"):
            open_store("s3://a-bucket").get_text("gone.json")
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_mirrored_file_continues_on_another_machine(where, request, tmp_path, monkeypatch):
    """What one machine appended is there for the next, even when the first one failed."""
    location = request.getfixturevalue("s3") + "/sweep" if where == "s3" else str(tmp_path / "x")
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "first-machine"))
    with pytest.raises(KeyboardInterrupt), mirrored_file(location, "history.jsonl") as path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("one\n")
        raise KeyboardInterrupt
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "second-machine"))
    with mirrored_file(location, "history.jsonl") as path:
        assert path.read_text() == "one\n"
        with path.open("a") as file:
            file.write("two\n")
    assert open_store(location).get_text("history.jsonl") == "one\ntwo\n"


def test_a_mirrored_file_takes_the_newest_rows_and_loses_none(s3, tmp_path, monkeypatch):
    """This machine's copy is older than S3's (another machine appended since): S3's wins. It
    extends S3's (its upload was lost): it is kept. It went another way: S3's is taken and this
    machine's kept beside it."""
    location = f"{s3}/job"
    store = open_store(location)
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    local = tmp_path / "s3" / location.removeprefix("s3://") / "log"
    local.parent.mkdir(parents=True)
    for before, remote, after in (
        ("a\n", "a\nb\n", "a\nb\n"),  # stale here
        ("a\nb\nc\n", "a\nb\n", "a\nb\nc\n"),  # newer here
        ("a\nx\n", "a\nb\nc\n", "a\nb\nc\n"),  # diverged
    ):
        local.write_text(before)
        store.put_text("log", remote)
        with mirrored_file(location, "log") as path:
            assert path.read_text() == after
        assert store.get_text("log") == after
    kept = list(local.parent.glob("log.diverged-*"))
    assert [file.read_text() for file in kept] == ["a\nx\n"]


@pytest.mark.parametrize("where", ["s3", "local"])
def test_remove_folder_deletes_everything_under_it_and_nothing_beside(where, request, tmp_path):
    root = request.getfixturevalue("s3") + "/runs" if where == "s3" else str(tmp_path / "runs")
    store = open_store(root)
    for key in ("scratch/a/one.txt", "scratch/two.txt", "scratch-kept.txt", "kept/three.txt"):
        store.put_text(key, key)
    remove_folder(f"{root}/scratch")
    remove_folder(f"{root}/never-written")  # nothing there is not an error
    assert store.keys("") == ["kept/three.txt", "scratch-kept.txt"]


def test_ray_locations_round_trip(s3, tmp_path):
    for location in (f"{s3}/runs/job", str(tmp_path / "runs")):
        assert from_ray_storage(*ray_storage(location)) == location


def test_a_pretrained_folder_on_s3_is_fetched_once_and_again_when_it_changes(
    s3, tmp_path, monkeypatch
):
    """model.path: s3://… is copied into Shipyard's cache and builds the model saved there; a
    changed object makes a new copy (the old one is never reused for new weights)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shipyard.models import model_family
    from shipyard.spec.job import JobSpec

    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "cache"))
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(config).eval()
    saved.save_pretrained(tmp_path / "pretrained", max_shard_size="40KB")
    store = open_store(f"{s3}/models/tiny")
    for file in (tmp_path / "pretrained").iterdir():
        store.upload(file, file.name)
    spec = {"type": "huggingface", "path": f"{s3}/models/tiny", "sequence_length": 16}
    job = JobSpec.model_validate({"name": "s3-model", "model": spec})
    family = model_family(job.model)
    family.check(job.train)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        built = family.build(seed=0).eval()(tokens)
        torch.testing.assert_close(built, saved(tokens).logits, atol=1e-5, rtol=1e-5)
    first = family.resolved.folder
    assert first.is_relative_to(tmp_path / "cache") and (first / "config.json").is_file()

    store.put_text("config.json", (first / "config.json").read_text().replace("64", "65", 1))
    changed = model_family(job.model).resolved.folder
    assert changed != first and first.is_dir(), "a new copy; the old one is left as it was"


def test_two_trials_checkpoints_of_one_name_are_downloaded_apart(s3, tmp_path):
    """Sweep trials each have a `checkpoint_000003`: the copy on this machine is named by the
    whole S3 location, and an `export/` folder found inside is never what gets served."""
    copies = []
    for trial in ("trial-a", "trial-b"):
        store = open_store(f"{s3}/sweep/{trial}/checkpoint_000003")
        metadata = {"job": {"name": trial}, "plan": {}, "metrics": {"step": 3}}
        store.put_text(METADATA_FILE, json.dumps(metadata))
        store.put_text("export/shipyard-export.json", "{}")  # planted; ignored
        saved = SavedCheckpoint(store.uri, 3, metadata["job"], {}, metadata["metrics"])
        copies.append(local_copy(saved, tmp_path / "cache"))
    assert copies[0].path != copies[1].path
    assert [copy.job["name"] for copy in copies] == ["trial-a", "trial-b"]
    assert all(not export_folder(copy).is_relative_to(copy.path) for copy in copies)
