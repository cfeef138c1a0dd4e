"""S3-compatible object storage through boto3: URLs, the client, one-line errors, and the
streamed multipart upload a dump is written into (issue 15).

Credentials, region and endpoint come from boto3's standard chain: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/{config,credentials}, instance roles,
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for MinIO, Ceph RGW, SeaweedFS or a local test server.

Exit codes of the errors below (sysexits): 73 no such bucket (EX_CANTCREAT), 77 bad credentials
or access denied (EX_NOPERM), 69 endpoint unreachable or not answering (EX_UNAVAILABLE), 74 any
other failed request (EX_IOERR).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kdumpling.errors import DumpWriteError, KdumplingError, PermissionDeniedError, UsageError
from kdumpling.sink_parts import DEFAULT_PART_SIZE, PartsSink

SCHEME = "s3://"
# botocore's own retries (standard mode: throttling, 5xx, dropped connections, with backoff) and
# timeouts bound every request; the part queue's stall timeout bounds the whole upload's wait.
MAX_ATTEMPTS = int(os.environ.get("KDUMPLING_S3_MAX_ATTEMPTS", "5"))
CONNECT_TIMEOUT = float(os.environ.get("KDUMPLING_S3_CONNECT_TIMEOUT", "10"))
READ_TIMEOUT = float(os.environ.get("KDUMPLING_S3_READ_TIMEOUT", "60"))
STALL_TIMEOUT = float(os.environ.get("KDUMPLING_S3_STALL_TIMEOUT", "300"))
PART_SIZE = int(os.environ.get("KDUMPLING_S3_PART_SIZE", str(DEFAULT_PART_SIZE)))
_READ_CHUNK = 8 << 20
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class S3Error(DumpWriteError):
    """A request to the object store failed (EX_IOERR)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class NoSuchBucketError(S3Error):
    exit_code = 73  # EX_CANTCREAT


class S3AccessError(PermissionDeniedError):
    """Missing or wrong credentials, or a policy that refuses the request (EX_NOPERM)."""


class S3UnreachableError(S3Error):
    exit_code = 69  # EX_UNAVAILABLE


class S3UnavailableError(UsageError):
    """boto3 is not installed."""


def is_s3_url(text: str | None) -> bool:
    return bool(text) and str(text).startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str  # a prefix when it ends with '/' or is empty

    @classmethod
    def parse(cls, text: str) -> S3Url:
        if not is_s3_url(text):
            raise UsageError(f"not an s3:// URL: {text!r}")
        bucket, _, key = text[len(SCHEME):].partition("/")
        if not bucket:
            raise UsageError(f"{text!r}: expected s3://BUCKET/PREFIX/ or s3://BUCKET/KEY")
        return cls(bucket, key)

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


def make_client() -> Any:
    """A boto3 S3 client from the standard chain, with bounded retries and timeouts."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise S3UnavailableError("s3:// output needs boto3: pip install 'kdumpling[s3]'") \
            from None
    config = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                    connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT)
    return boto3.session.Session().client("s3", config=config)


def translate(err: BaseException, what: str) -> KdumplingError:
    """One line naming what failed and why, with the class that carries the exit code."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(err, KdumplingError):
        return err
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return S3AccessError(f"{what}: no S3 credentials (set AWS_PROFILE or "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if isinstance(err, ReadTimeoutError):
        return S3UnreachableError(f"{what}: the S3 endpoint stopped answering ({err})")
    if isinstance(err, ConnectionError):
        return S3UnreachableError(f"{what}: cannot reach the S3 endpoint ({err})")
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")) or code
        if code == "NoSuchBucket":
            return NoSuchBucketError(f"{what}: no such bucket")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                    "ExpiredToken", "InvalidToken", "403"):
            return S3AccessError(f"{what}: access denied by the S3 endpoint ({code})")
        return S3Error(f"{what}: {code}: {message}")
    return S3Error(f"{what}: {err}")


@contextlib.contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Turn boto3/botocore exceptions inside the block into one-line KdumplingErrors."""
    try:
        yield
    except KdumplingError:
        raise
    except Exception as err:
        raise translate(err, what) from err


def not_found(err: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(err, ClientError):
        return False
    code = str(err.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def head(client: Any, url: S3Url) -> dict[str, Any] | None:
    """The object's metadata, None when there is no such object (HEAD has no error body: a
    missing bucket also reads as 404, so stores check the bucket when they open)."""
    try:
        return dict(client.head_object(Bucket=url.bucket, Key=url.key))
    except Exception as err:
        if not_found(err):
            return None
        raise translate(err, str(url)) from err


def check_bucket(client: Any, url: S3Url) -> None:
    """NoSuchBucketError, S3AccessError or S3UnreachableError now, not halfway through a dump."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=url.bucket)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise NoSuchBucketError(f"{url}: no such bucket {url.bucket!r}") from None
        raise translate(err, str(url)) from err
    except Exception as err:
        raise translate(err, str(url)) from err


def iter_object(client: Any, url: S3Url) -> Iterator[bytes]:
    """The object's bytes in order, streamed (never more than a chunk in memory)."""
    with s3_errors(str(url)):
        body = client.get_object(Bucket=url.bucket, Key=url.key)["Body"]
        try:
            while chunk := body.read(_READ_CHUNK):
                yield chunk
        finally:
            body.close()


def sha256_object(client: Any, url: S3Url,
                  check: Callable[[], None] | None = None) -> tuple[str, int]:
    """(sha256, size) of the object's bytes, read back in one streamed GET; ``check`` runs
    between chunks (cancellation)."""
    h = hashlib.sha256()
    size = 0
    for chunk in iter_object(client, url):
        if check is not None:
            check()
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


class MultipartUpload(PartsSink):
    """A dump streamed into one object: parts go up on the sending thread as they fill, the
    kdump/ELF head (part 1) last; ``finish`` completes the object; ``abort`` (the store's
    abandon, on any error, SIGTERM or SIGINT) leaves no object and no open upload."""

    def __init__(self, client: Any, url: S3Url, *, part_size: int = PART_SIZE,
                 stall_timeout: float = STALL_TIMEOUT) -> None:
        self.client, self.url = client, url
        self.etags: dict[int, str] = {}
        self.completed = self.aborted = False
        with s3_errors(f"cannot start an upload to {url}"):
            reply = client.create_multipart_upload(Bucket=url.bucket, Key=url.key,
                                                   ContentType="application/octet-stream")
        self.upload_id = str(reply["UploadId"])
        super().__init__(str(url), self._upload_part, part_size=part_size,
                         stall_timeout=stall_timeout)

    def _upload_part(self, number: int, data: bytes) -> None:
        with s3_errors(f"{self.url}: part {number}"):
            reply = self.client.upload_part(Bucket=self.url.bucket, Key=self.url.key,
                                            UploadId=self.upload_id, PartNumber=number,
                                            Body=io.BytesIO(data))
        self.etags[number] = str(reply["ETag"])

    def finish(self) -> None:
        super().finish()
        parts = [{"PartNumber": n, "ETag": self.etags[n]} for n in sorted(self.etags)]
        with s3_errors(f"cannot complete {self.url}"):
            self.client.complete_multipart_upload(
                Bucket=self.url.bucket, Key=self.url.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": parts})
        self.completed = True

    def close(self) -> None:
        """Stop sending (error paths). The abort is the store's ``abandon``, after the collector
        has released the target: a request to an endpoint that is down must not lengthen the
        target's pause."""
        super().close()

    def abort(self) -> None:
        """Abort the upload unless it completed (then the object is the caller's to delete)."""
        if self.completed or self.aborted:
            return
        self.aborted = True
        abort_upload(self.client, self.url, self.upload_id)


def abort_upload(client: Any, url: S3Url, upload_id: str) -> None:
    """Best effort: the upload may be gone already (aborted, completed, expired)."""
    with contextlib.suppress(Exception):
        client.abort_multipart_upload(Bucket=url.bucket, Key=url.key, UploadId=upload_id)


def upload_file(client: Any, path: str, url: S3Url,
                check: Callable[[], None] | None = None) -> None:
    """A finished local file into one object (``--spool``): boto3's managed transfer, parts of
    PART_SIZE on a few threads. ``check`` runs as bytes go out; what it raises (cancellation)
    fails the transfer, which then aborts its multipart upload (s3transfer), and is raised
    here."""
    from boto3.s3.transfer import TransferConfig

    stopped: list[BaseException] = []

    def progress(_n: int) -> None:
        if check is not None:
            try:
                check()
            except BaseException as err:
                stopped.append(err)
                raise

    config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                            max_concurrency=2)
    failed: list[BaseException] = []

    def transfer() -> None:
        # The record's write defers SIGTERM/SIGINT by blocking them (agent/capture.py), and
        # threads inherit that mask: this one and s3transfer's take them again, so a signal
        # during the upload reaches the handler, which sets the cancel ``check`` raises.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        try:
            with s3_errors(f"cannot upload {path} to {url}"):
                client.upload_file(path, url.bucket, url.key, Config=config, Callback=progress)
        except BaseException as err:
            failed.append(err)

    worker = threading.Thread(target=transfer, name="spool-upload", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)  # wake up: Python runs signal handlers on the main thread only
    if stopped:
        raise stopped[0]
    if failed:
        raise failed[0]
