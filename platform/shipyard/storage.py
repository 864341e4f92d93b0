"""Artifacts in a local folder or under an S3 prefix, published so a reader never sees half.

A publish uploads a version's files under `<name>/<version>/`, then its manifest (every file's
size and SHA-256), and only then moves the `<name>/latest` pointer. One S3 PUT, like one
`os.replace`, is atomic, so a crash mid-upload leaves the old pointer to complete files; the
abandoned version has no manifest and is never listed. A pull checks every file's SHA-256
against the manifest before it hands the folder over. S3 goes through boto3 with the standard
credential chain (and AWS_ENDPOINT_URL, or `endpoint_url`, for MinIO, Ceph or LocalStack):
multipart above 16 MiB and retries with backoff.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from shipyard.errors import ShipyardError

MANIFEST = "manifest.json"
LATEST = "latest"
MULTIPART_BYTES = 16 * 1024**2
# botocore's names for credentials that do not renew themselves (unlike roles).
STATIC_CREDENTIALS = ("env", "explicit", "shared-credentials-file", "config-file")


class StorageError(ShipyardError):
    """Storage cannot be used (missing bucket, bad credentials, no endpoint) or lost data."""


class ChecksumError(StorageError):
    """A downloaded file is not what was published."""


@dataclass(frozen=True)
class Manifest:
    """One published version: its files with their sizes and SHA-256 digests."""

    name: str
    version: str
    files: dict[str, dict[str, Any]]  # relative path -> {"bytes": n, "sha256": hex}
    metadata: dict[str, Any]


def safe_relative(path: str, where: str) -> str:
    """`path` if it names a file strictly inside a folder, else a StorageError naming `where`.

    Manifests and S3 keys come from whoever can write the store: an absolute path, a `..`, an
    empty segment (`a//b`, which would make the rest absolute once joined) or a backslash must
    never decide where a file lands on this machine.
    """
    parts = path.split("/")
    if not path or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise StorageError(
            f"{where}: {path!r} is not a relative path inside the folder; nothing was written. "
            "Only plain '/'-separated names are accepted (no leading '/', '..', '.' or '//')."
        )
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Store(Protocol):
    """The few object operations a publish needs; keys are '/'-separated, under a root."""

    uri: str

    def upload(self, local: Path, key: str) -> None: ...

    def download(self, key: str, local: Path) -> None: ...

    def put_text(self, key: str, text: str) -> None: ...

    def get_text(self, key: str) -> str | None:
        """The object's text, or None if there is no such object."""
        ...

    def keys(self, prefix: str) -> list[str]: ...

    def check(self) -> None:
        """Raise StorageError, saying how to fix it, unless the store can be read and written."""
        ...


class LocalStore:
    """A folder on this machine (or a shared file system)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def upload(self, local: Path, key: str) -> None:
        self._replace(key, lambda temporary: shutil.copyfile(local, temporary))

    def download(self, key: str, local: Path) -> None:
        shutil.copyfile(self.root / key, local)

    def put_text(self, key: str, text: str) -> None:
        self._replace(key, lambda temporary: Path(temporary).write_text(text))

    def get_text(self, key: str) -> str | None:
        path = self.root / key
        return path.read_text() if path.is_file() else None

    def keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root):
                pass
        except OSError as error:
            raise StorageError(
                f"storage: {self.uri}: cannot write there ({error.strerror}). To fix: choose a "
                "folder you can write, or an s3:// location."
            ) from None

    def _replace(self, key: str, write) -> None:
        """Write beside the target, then rename over it: readers see old or new, never half."""
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(handle)
        try:
            write(temporary)
            os.replace(temporary, target)
        finally:
            Path(temporary).unlink(missing_ok=True)


class S3Store:
    """`s3://bucket/prefix` through boto3."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.uri = uri.rstrip("/")
        self.bucket, _, self.prefix = self.uri.removeprefix("s3://").partition("/")
        if not self.bucket:
            raise StorageError(f"storage: {uri!r} names no bucket. To fix: s3://bucket/prefix.")
        retries = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5)
        self.session = boto3.Session()
        self.client = self.session.client("s3", endpoint_url=endpoint_url, config=retries)
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def upload(self, local: Path, key: str) -> None:
        with self._answering(key):
            self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer)

    def download(self, key: str, local: Path) -> None:
        with self._answering(key):
            self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer)

    def put_text(self, key: str, text: str) -> None:
        with self._answering(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=text.encode())

    def get_text(self, key: str) -> str | None:
        with self._answering(key):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except self.client.exceptions.NoSuchKey:
                return None
            return answer["Body"].read().decode()

    @contextmanager
    def _answering(self, key: str) -> Iterator[None]:
        """S3's refusals for one object as StorageErrors that name it (boto3 has retried)."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"{self.uri}/{key}"
        try:
            yield
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            raise StorageError(_object_error_message(where, code)) from None
        except BotoCoreError as error:  # endpoint unreachable after retries, bad URL
            raise StorageError(
                f"{where}: cannot reach S3 ({error}). To fix: check the endpoint "
                "(AWS_ENDPOINT_URL for MinIO, Ceph or LocalStack) and the network."
            ) from None

    def keys(self, prefix: str) -> list[str]:
        return sorted(self.listing(prefix))

    def listing(self, prefix: str) -> dict[str, tuple[str, int]]:
        """Every object under `prefix`, with its ETag (which changes when the object does) and
        its size."""
        found = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        )
        strip = len(self._key(""))
        for page in pages:
            for item in page.get("Contents", []):
                # Keys ending in "/" are folder markers (pyarrow writes them), not files.
                if item["Key"][-1] != "/":
                    found[item["Key"][strip:]] = (item.get("ETag", ""), item.get("Size", 0))
        return found

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageError(
                f"storage: {self.uri}: no AWS credentials found. To fix: set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the machine a role."
            ) from None
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            raise StorageError(_client_error_message(self.uri, self.bucket, code)) from None
        except BotoCoreError as error:  # endpoint unreachable, bad URL
            raise StorageError(
                f"storage: {self.uri}: cannot reach S3 ({error}). To fix: check the endpoint "
                "(AWS_ENDPOINT_URL for MinIO, Ceph or LocalStack) and the network."
            ) from None

    def arrow_filesystem(self):
        """This bucket as a pyarrow S3FileSystem, for Ray Train, which pickles it to the
        controller and every worker: same endpoint and region as this client. Static keys
        (environment, credentials file) travel with it; a role is found by each node itself."""
        from urllib.parse import urlsplit

        from pyarrow.fs import S3FileSystem

        options: dict[str, Any] = {"region": self.client.meta.region_name}
        endpoint = urlsplit(self.client.meta.endpoint_url)
        if not endpoint.netloc.endswith(".amazonaws.com"):  # MinIO, Ceph, LocalStack, moto
            options |= {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme}
        credentials = self.session.get_credentials()
        if credentials is not None and credentials.method in STATIC_CREDENTIALS:
            frozen = credentials.get_frozen_credentials()
            options |= {
                "access_key": frozen.access_key,
                "secret_key": frozen.secret_key,
                "session_token": frozen.token,
            }
        return S3FileSystem(**options)


def _client_error_message(uri: str, bucket: str, code: str) -> str:
    if code in ("404", "NoSuchBucket"):
        return f"storage: {uri}: bucket {bucket!r} does not exist. To fix: create it first."
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return (
            f"storage: {uri}: the credentials were refused for bucket {bucket!r} ({code}). "
            "To fix: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile's rights."
        )
    return f"storage: {uri}: S3 answered {code} for bucket {bucket!r}."


def _object_error_message(where: str, code: str) -> str:
    if code in ("404", "NoSuchKey"):
        return f"{where}: no such object on S3."
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        return (
            f"{where}: the credentials were refused ({code}). To fix: check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile."
        )
    if code in ("403", "AccessDenied"):
        # S3 answers 403, not 404, for a missing key when the caller may not list the bucket.
        return (
            f"{where}: S3 refused access (403). Either the object does not exist and these "
            "credentials may not list the bucket (s3:ListBucket), or they may not read it "
            "(s3:GetObject). To fix: check the location and the credentials' rights."
        )
    if code == "NoSuchBucket":
        return f"{where}: the bucket does not exist. To fix: create it first."
    return f"{where}: S3 answered {code or 'an error'}."


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a file beside it and a rename: old or new, never half."""
    LocalStore(path.parent).put_text(path.name, text)


def open_store(uri: str | Path, endpoint_url: str | None = None) -> Store:
    """The store for a local path or an `s3://bucket/prefix` URI."""
    text = str(uri)
    if is_remote(text):
        return S3Store(text, endpoint_url)
    return LocalStore(text)


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def cache_root() -> Path:
    """Shipyard's own files on this machine (SHIPYARD_CACHE, else ~/.cache/shipyard)."""
    return Path(os.environ.get("SHIPYARD_CACHE", "~/.cache/shipyard")).expanduser()


def local_mirror(uri: str) -> Path:
    """The folder on this machine that stands for a storage location: the folder itself, or
    for `s3://bucket/prefix` a cache folder for what is downloaded from it or kept beside it."""
    if not is_remote(uri):
        return Path(uri)
    return cache_root() / "s3" / uri.removeprefix("s3://").rstrip("/")


def ray_storage(uri: str) -> tuple[str, Any]:
    """`RunConfig`'s storage_path and storage_filesystem for a folder or an S3 location (Ray
    wants the bucket path without its scheme when it is given the file system)."""
    if not is_remote(uri):
        return uri, None
    store = S3Store(uri)
    return store.uri.removeprefix("s3://"), store.arrow_filesystem()


def from_ray_storage(path: str, filesystem: Any) -> str:
    """The inverse of `ray_storage`: a location as Ray names it (a checkpoint's path and file
    system) as Shipyard names it."""
    if filesystem is not None and filesystem.type_name == "s3":
        return f"s3://{path}"
    return path


def remove_folder(uri: str) -> None:
    """Delete a folder, or every object under an S3 prefix; nothing there is not an error."""
    path, filesystem = ray_storage(uri)
    if filesystem is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    with suppress(FileNotFoundError):
        filesystem.delete_dir(path)


@contextmanager
def mirrored_file(location: str, key: str) -> Iterator[Path]:
    """The append-only text file `key` of a storage location as a file on this machine. On S3
    the local copy is first brought up to date (`_catch_up`), and uploaded back afterwards,
    also after a failure or Ctrl-C, so a run continued on another machine continues the file."""
    path = local_mirror(location) / key
    if not is_remote(location):
        yield path
        return
    store = open_store(location)
    _catch_up(path, store.get_text(key))
    try:
        yield path
    finally:
        if path.is_file():
            store.upload(path, key)


def _catch_up(path: Path, remote: str | None) -> None:
    """Make `path` hold at least what S3 holds. A local copy that extends S3's (its upload was
    lost) is kept; an older one is replaced; one that went another way is kept beside, renamed,
    so that no row is lost."""
    if remote is None:
        return
    local = path.read_text() if path.is_file() else None
    if local is not None and local.startswith(remote):
        return
    if local is not None and not remote.startswith(local):
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path.rename(path.with_name(f"{path.name}.diverged-{stamp}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(remote)


def download_folder(store: Store, prefix: str, target: Path) -> Path:
    """Every object under `prefix/` into `target`, which appears only once all are there."""
    if target.exists():
        raise StorageError(f"{target} already exists; it is left as it is.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for key in store.keys(f"{prefix}/"):
            relative = safe_relative(key.removeprefix(f"{prefix}/"), f"{store.uri}/{key}")
            local = staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            store.download(key, local)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def publish(
    store: Store, name: str, folder: Path, metadata: dict[str, Any] | None = None
) -> Manifest:
    """Upload every file under `folder` as a new version of `name`, then point `latest` at it."""
    # Sortable by time; the random tail keeps two writers in one microsecond apart.
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + f"-{os.urandom(3).hex()}"
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        files[relative] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        store.upload(path, f"{name}/{version}/{relative}")
    manifest = Manifest(name, version, files, metadata or {})
    store.put_text(f"{name}/{version}/{MANIFEST}", json.dumps(manifest.__dict__, indent=2))
    store.put_text(f"{name}/{LATEST}", json.dumps({"version": version}))
    return manifest


def versions(store: Store, name: str) -> list[Manifest]:
    """Every complete version of `name` (those with a manifest), oldest first."""
    manifests = []
    for key in store.keys(f"{name}/"):
        if key.count("/") == 2 and key.endswith(f"/{MANIFEST}"):
            manifests.append(_manifest(store, key))
    return sorted(manifests, key=lambda manifest: manifest.version)


def latest(store: Store, name: str) -> Manifest | None:
    """The version `latest` points at, or None if nothing was published yet."""
    key = f"{name}/{LATEST}"
    pointer = store.get_text(key)
    if pointer is None:
        return None
    version = _field(store, key, _json_object(store, key, pointer), "version", str)
    return _manifest(store, f"{name}/{_one_name(store, key, version)}/{MANIFEST}")


def pull(store: Store, manifest: Manifest, destination: Path) -> Path:
    """Download `manifest`'s files into `destination/<version>`, each checked against its
    SHA-256; the folder appears only when all are, and an existing one is never overwritten."""
    target = destination / manifest.version
    if target.exists():
        raise StorageError(f"{target} already exists; it is left as it is.")
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination, prefix=f".{manifest.version}."))
    try:
        for relative, expected in manifest.files.items():
            local = staging / safe_relative(relative, f"{store.uri}/{manifest.name}")
            local.parent.mkdir(parents=True, exist_ok=True)
            store.download(f"{manifest.name}/{manifest.version}/{relative}", local)
            if sha256_of(local) != expected["sha256"]:
                raise ChecksumError(
                    f"{store.uri}/{manifest.name}/{manifest.version}/{relative}: its SHA-256 "
                    "differs from the manifest's; the download is discarded."
                )
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _manifest(store: Store, key: str) -> Manifest:
    """The manifest at `key`, checked: it decides which files a pull writes where."""
    text = store.get_text(key)
    if text is None:
        raise StorageError(f"{store.uri}/{key}: the manifest is missing (changed by hand?).")
    document = _json_object(store, key, text)
    name = _field(store, key, document, "name", str)
    version = _field(store, key, document, "version", str)
    files = _field(store, key, document, "files", dict)
    for relative, facts in files.items():
        safe_relative(relative, f"{store.uri}/{key}: files")
        if not isinstance(facts, dict) or not isinstance(facts.get("sha256"), str):
            raise StorageError(f"{store.uri}/{key}: files: {relative!r} has no sha256.")
    return Manifest(
        name=_one_name(store, key, name),
        version=_one_name(store, key, version),
        files=files,
        metadata=_field(store, key, document, "metadata", dict),
    )


def _json_object(store: Store, key: str, text: str) -> dict[str, Any]:
    """The JSON object in `text` (the object at `key`), or a StorageError naming it."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise StorageError(f"{store.uri}/{key}: not a JSON object (corrupt?).")
    return document


def _field(store: Store, key: str, document: dict[str, Any], field: str, kind: type) -> Any:
    """`field` of `document` (the object at `key`), of type `kind`, or a StorageError."""
    value = document.get(field)
    if not isinstance(value, kind):
        raise StorageError(f"{store.uri}/{key}: {field}: expected a {kind.__name__}.")
    return value


def _one_name(store: Store, key: str, name: str) -> str:
    """A name that must be one path segment (a job, a version)."""
    if "/" in name:
        raise StorageError(f"{store.uri}/{key}: {name!r} is not a single name.")
    return safe_relative(name, f"{store.uri}/{key}")
