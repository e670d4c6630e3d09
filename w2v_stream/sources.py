"""Where shards come from: local paths and brace patterns, folders, http(s), s3 and pipe URLs.

Owns opening a shard or index by URL as a byte stream, with retries for remote stores.
Nothing here runs a shell: ``pipe:`` URLs are refused unless the caller opts in, and even
then the command is split into arguments (``shlex.split``) and run without a shell.

A ``pipe:`` source is a command template with ``{}`` where a file name goes
(``pipe:aws s3 cp s3://bucket/shards/{} -``): the index is read through the command with
``index.json`` in place of ``{}``, and each shard it lists through the command with the
shard's file name. A command that cannot start or exits non-zero is a SourceError.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import braceexpand

from .shards import INDEX_NAME, parse_index

REMOTE_SCHEMES = ("http://", "https://", "s3://")
PIPE = "pipe:"
STDERR_TAIL = 500  # characters of a failed command's stderr quoted in its SourceError
RETRIES = 4  # attempts for a remote open, with exponential backoff from BACKOFF_SECONDS
BACKOFF_SECONDS = 0.5


class SourceError(IOError):
    """A shard or index could not be opened or read."""


@dataclass(frozen=True)
class ShardList:
    urls: tuple[str, ...]
    lengths: tuple[tuple[int, ...], ...]  # num_samples of each sample, per shard
    sample_rate: int


def _join(base: str, name: str) -> str:
    """The URL of file ``name`` in ``base``: a folder URL, or a pipe: template."""
    if base.startswith(PIPE):
        return base.replace("{}", name)
    return base.rstrip("/") + "/" + name


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def open_url(url: str, allow_pipe: bool = False, s3_endpoint_url: str | None = None) -> BinaryIO:
    """A readable binary stream for a local path, http(s)://, s3:// or (opt-in) pipe: URL."""
    if url.startswith(PIPE):
        if not allow_pipe:
            raise SourceError(
                f"{url}: pipe: URLs run a command and are refused; pass "
                f"--allow_pipe_urls if you trust this source"
            )
        return PipeStream(url)
    if url.startswith(("http://", "https://")):
        return _retry(url, lambda: urllib.request.urlopen(url, timeout=60))
    if url.startswith("s3://"):
        return _retry(url, lambda: _open_s3(url, s3_endpoint_url))
    try:
        return open(_local_path(url), "rb")
    except OSError as exc:
        raise SourceError(f"{url}: {exc.strerror or exc}") from None


class PipeStream:
    """The stdout of a ``pipe:`` URL's command as a readable binary stream.

    The command runs without a shell; its stderr goes to a temporary file so a chatty
    command never blocks. Reaching the end of the output checks the exit status: a command
    that failed raises SourceError with the URL and the tail of its stderr. Closing early
    (a reader that has what it needs) ends the command without an error.
    """

    def __init__(self, url: str):
        self.url = url
        try:
            args = shlex.split(url[len(PIPE) :])
        except ValueError as exc:
            raise SourceError(f"{url}: cannot split the command ({exc})") from None
        if not args:
            raise SourceError(f"{url}: no command after pipe:")
        # Read and closed in close(), when the command has ended.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
            )
        except OSError as exc:
            self._stderr.close()
            raise SourceError(f"{url}: cannot start {args[0]!r} ({exc.strerror or exc})") from None

    def read(self, n: int = -1) -> bytes:
        data = self._proc.stdout.read(n)
        if n != 0 and (n < 0 or len(data) < n):  # a short read: the output has ended
            self._check_exit()
        return data

    def _check_exit(self) -> None:
        code = self._proc.wait()
        if code != 0:
            self._stderr.seek(0)
            tail = self._stderr.read().decode("utf-8", "replace").strip()[-STDERR_TAIL:]
            raise SourceError(
                f"{self.url}: the command exited with status {code}" + (f": {tail}" if tail else "")
            )

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.stdout.close()
        self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> PipeStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _retry(url: str, opener):
    delay = BACKOFF_SECONDS
    for attempt in range(1, RETRIES + 1):
        try:
            return opener()
        except urllib.error.HTTPError as exc:
            if (exc.code < 500 and exc.code != 429) or attempt == RETRIES:
                raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except Exception as exc:  # network and S3 client errors: try again, then report
            if attempt == RETRIES or _is_missing(exc):
                raise SourceError(f"{url}: {exc}") from None
        time.sleep(delay)
        delay *= 2
    raise SourceError(f"{url}: unreachable")


def _is_missing(exc: Exception) -> bool:
    """An S3 answer that retrying cannot change (botocore errors carry it in .response)."""
    code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
    return code in ("NoSuchKey", "NoSuchBucket", "404", "AccessDenied", "403")


def _open_s3(url: str, endpoint_url: str | None):
    import boto3  # only s3:// sources need it

    bucket, _, key = url[len("s3://") :].partition("/")
    client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    return client.get_object(Bucket=bucket, Key=key)["Body"]


def resolve(
    spec: str | list[str], allow_pipe: bool = False, s3_endpoint_url: str | None = None
) -> ShardList:
    """Shards and their lengths from a folder/URL holding index.json, an index.json itself,
    shard paths/URLs and brace patterns (``shard-{000000..000009}.tar``) whose folder holds
    index.json, or a ``pipe:`` command template (every shard its index lists). Lengths
    always come from the index: planning needs them."""
    open_args = {"allow_pipe": allow_pipe, "s3_endpoint_url": s3_endpoint_url}
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    lengths: list[tuple[int, ...]] = []
    rate = None
    indexes: dict[str, dict] = {}
    for item in specs:
        if item.startswith(PIPE) and "{}" not in item:
            raise SourceError(
                f"{item}: a pipe: source is a command with {{}} where a file "
                f"name goes, e.g. 'pipe:aws s3 cp s3://bucket/shards/{{}} -'"
            )
        expanded = [item] if item.startswith(PIPE) else list(braceexpand.braceexpand(item))
        for url in expanded:
            if url.startswith(PIPE):
                base, names = url, None
            elif url.endswith(INDEX_NAME):
                base, names = _parent(url), None
            elif url.endswith(".tar"):
                base, names = _parent(url), [url.rsplit("/", 1)[-1]]
            else:
                base, names = url.rstrip("/"), None
            if base not in indexes:
                indexes[base] = _load_index(_join(base, INDEX_NAME), open_args)
            index = indexes[base]
            by_name = {e["file"]: e for e in index["shards"]}
            for name in names or [e["file"] for e in index["shards"]]:
                if name not in by_name:
                    raise SourceError(
                        f"{_join(base, name)}: not listed in {_join(base, INDEX_NAME)}"
                    )
                urls.append(url if names else _join(base, name))
                lengths.append(tuple(int(n) for n in by_name[name]["num_samples"]))
            if rate not in (None, index["sample_rate"]):
                raise SourceError(
                    f"{_join(base, INDEX_NAME)}: sample rate "
                    f"{index['sample_rate']} differs from "
                    f"the other shards' {rate}"
                )
            rate = index["sample_rate"]
    if not urls:
        raise SourceError(f"{spec}: no shards")
    return ShardList(tuple(urls), tuple(lengths), int(rate))


def _local_path(url: str) -> str:
    """The file path of a local shard URL: a plain path or a file:// URL."""
    return url[len("file://") :] if url.startswith("file://") else url


def _load_index(url: str, open_args: dict) -> dict:
    """The checked index at ``url`` (shards.parse_index: the converter's own check)."""
    local = not url.startswith((*REMOTE_SCHEMES, PIPE))
    if local and not Path(_local_path(url)).exists():
        raise SourceError(f"{url}: no index.json; shards need one (tools/make_shards.py writes it)")
    with open_url(url, **open_args) as f:
        data = f.read()
    return parse_index(data, url)
