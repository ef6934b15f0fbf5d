"""Where a store lives: a local folder, or an object-store URI (``s3://bucket/prefix``;
``gs://`` and ``az://`` go through Lance's and pyarrow's object-store support, untested here).

Object stores take their credentials and endpoint from the standard environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, and
``AWS_ALLOW_HTTP=true`` for a local server such as moto or MinIO): Lance, pyarrow and boto3
all read them, so every process of a Ray cluster that has them set sees the same store.

Before the first access to an ``s3://`` store, :meth:`StoreLocation.check` lists the prefix
once with short time-outs, so an unreachable endpoint, a missing bucket or refused
credentials each give one clear :class:`~stimage_embed.errors.StoreError`, before anything
is written (Lance's own client would retry for minutes).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

from stimage_embed.errors import StoreError

#: URI schemes served by an object store (everything else is a local path)
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
#: seconds the preflight check waits to connect / for an answer
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 10


def is_remote(where: str | Path) -> bool:
    """True for an object-store URI such as ``s3://bucket/prefix``."""
    text = str(where)
    return "://" in text and urlparse(text).scheme.lower() in REMOTE_SCHEMES


class ObjectPath(str):
    """An object-store URI that joins like a ``Path`` (``uri / "models"``) and prints as itself."""

    def __truediv__(self, part: str) -> ObjectPath:
        return ObjectPath(self.rstrip("/") + "/" + str(part).strip("/"))

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def storage_options() -> dict[str, str]:
    """Lance ``storage_options`` from the AWS environment (endpoint, plain HTTP, region).
    Lance reads most of these itself; passing them keeps every process (Ray workers too)
    on the same settings. Empty for a plain AWS setup."""
    opts = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["aws_endpoint"] = endpoint
    if _env_flag("AWS_ALLOW_HTTP") or (endpoint or "").startswith("http://"):
        opts["allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["aws_region"] = region
    return opts


#: environment variables a remote Ray worker needs to reach the same object store
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ALLOW_HTTP",
)


def forwarded_env() -> dict[str, str]:
    """The object-store variables set here, to hand to Ray workers (``runtime_env``)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


class StoreLocation:
    """A store's root: ``path`` is a resolved ``Path`` (local) or an :class:`ObjectPath`."""

    def __init__(self, where: str | Path):
        self.remote = is_remote(where)
        self.given = str(where)  # as the user gave it (not resolved): what a saved model records
        if self.remote:
            self.path: Path | ObjectPath = ObjectPath(str(where).rstrip("/"))
            parsed = urlparse(str(where))
            self.scheme, self.bucket, self.prefix = parsed.scheme.lower(), parsed.netloc, parsed.path.strip("/")
            if not self.bucket:
                raise StoreError(f"{where}: no bucket in the store URI (expected s3://BUCKET/PREFIX)")
        else:
            self.path = Path(where).expanduser().resolve()
        self._fs = None
        self._checked = False

    @property
    def uri(self) -> str:
        return str(self.path)

    def storage_options(self) -> dict[str, str] | None:
        return storage_options() if self.remote else None

    # -- the pyarrow file system under the store (object stores) ------------------------
    def _filesystem(self):
        """``(pyarrow FileSystem, root path in it)`` of a remote store."""
        if self._fs is None:
            import pyarrow.fs as pafs

            self.check()

            try:
                self._fs = pafs.FileSystem.from_uri(self.uri)
            except (pa_error(), ValueError) as exc:
                raise StoreError(f"{self.uri}: cannot open the object store: {_one_line(exc)}") from exc
        return self._fs

    def _info(self, rel: str):
        fs, root = self._filesystem()
        return fs, f"{root}/{rel}".rstrip("/")

    def is_dir(self, rel: str = "") -> bool:
        if not self.remote:
            return (self.path / rel).is_dir()
        import pyarrow.fs as pafs

        fs, p = self._info(rel)
        return fs.get_file_info(p).type == pafs.FileType.Directory

    def listdir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty if it does not exist)."""
        if not self.remote:
            d = self.path / rel
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        import pyarrow.fs as pafs

        fs, p = self._info(rel)
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def touch(self, rel: str) -> None:
        if not self.remote:
            (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.path / rel).touch()
            return
        fs, p = self._info(rel)
        with fs.open_output_stream(p) as out:
            out.write(b"")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file (a pending mark's JSON); one PUT on object storage."""
        if not self.remote:
            (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path / f"{rel}.tmp"
            tmp.write_bytes(data)
            tmp.replace(self.path / rel)
            return
        fs, p = self._info(rel)
        with fs.open_output_stream(p) as out:
            out.write(data)

    def read_bytes(self, rel: str) -> bytes | None:
        """A small file's bytes, or None if it does not exist."""
        if not self.remote:
            try:
                return (self.path / rel).read_bytes()
            except FileNotFoundError:
                return None
        import pyarrow.fs as pafs

        fs, p = self._info(rel)
        if fs.get_file_info(p).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(p) as src:
            return src.read()

    def remove(self, rel: str) -> None:
        """Delete one file (nothing if it does not exist)."""
        if not self.remote:
            (self.path / rel).unlink(missing_ok=True)
            return
        import pyarrow.fs as pafs

        fs, p = self._info(rel)
        if fs.get_file_info(p).type != pafs.FileType.NotFound:
            fs.delete_file(p)

    def remove_tree(self, rel: str) -> None:
        """Delete a folder and everything under it (a table directory)."""
        if not self.remote:
            import shutil

            shutil.rmtree(self.path / rel, ignore_errors=True)
            return
        fs, p = self._info(rel)
        fs.delete_dir_contents(p, missing_dir_ok=True)
        if self.is_dir(rel):
            fs.delete_dir(p)

    # -- reachability --------------------------------------------------------------------
    def check(self) -> None:
        """Fail with one clear :class:`StoreError` if the object store cannot be used: the
        endpoint is unreachable, the bucket does not exist, or the credentials are refused.
        Local stores and non-S3 schemes pass (Lance reports their errors). Runs once."""
        if not self.remote or self._checked or self.scheme not in ("s3", "s3a"):
            return
        try:
            import boto3
            import botocore.config
            import botocore.exceptions as bx
        except ImportError as exc:
            raise StoreError(
                f"{self.uri}: object-store stores need the [distributed] extra "
                "(pip install 'stimage-embed[distributed]')"
            ) from exc
        # botocore says at INFO where it found the credentials, on every command: not news
        logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f"endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "AWS S3"
        cfg = botocore.config.Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"total_max_attempts": 2, "mode": "standard"},
        )
        try:
            client = boto3.client("s3", endpoint_url=endpoint, config=cfg)
            client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except bx.NoCredentialsError as exc:
            raise StoreError(
                f"{self.uri}: no object-store credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            ) from exc
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError) as exc:
            raise StoreError(f"{self.uri}: cannot reach the object store at {where}: {_one_line(exc)}") from exc
        except bx.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchBucket", "404"):
                raise StoreError(
                    f"{self.uri}: bucket {self.bucket!r} does not exist at {where}; create it first"
                ) from exc
            if code in (
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "403",
                "InvalidToken",
                "ExpiredToken",
                "AuthorizationHeaderMalformed",
            ):
                raise StoreError(
                    f"{self.uri}: the object store at {where} refused the credentials "
                    f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {code}"
                ) from exc
            raise StoreError(f"{self.uri}: the object store at {where} answered {code}: {_one_line(exc)}") from exc
        except bx.BotoCoreError as exc:
            raise StoreError(f"{self.uri}: cannot use the object store at {where}: {_one_line(exc)}") from exc
        self._checked = True


def pa_error() -> type[Exception]:
    import pyarrow as pa

    return pa.ArrowException


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
