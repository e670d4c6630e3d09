"""Where shards come from: local paths and brace patterns, folders, http(s) and s3 URLs.

Owns opening a shard or index by URL as a byte stream, with retries for remote stores.
Nothing here runs a shell: ``pipe:`` URLs are refused unless the caller opts in, and even
then the command is split into arguments and run without a shell.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import braceexpand

from .shards import INDEX_NAME, FORMAT_NAME, ShardFormatError

REMOTE_SCHEMES = ("http://", "https://", "s3://")
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
    return base.rstrip("/") + "/" + name


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def open_url(url: str, allow_pipe: bool = False, s3_endpoint_url: str | None = None) -> BinaryIO:
    """A readable binary stream for a local path, http(s)://, s3:// or (opt-in) pipe: URL."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise SourceError(f"{url}: pipe: URLs run a command and are refused; pass "
                              f"--allow_pipe_urls if you trust this source")
        proc = subprocess.Popen(shlex.split(url[5:]), stdout=subprocess.PIPE)
        return proc.stdout
    if url.startswith(("http://", "https://")):
        return _retry(url, lambda: urllib.request.urlopen(url, timeout=60))
    if url.startswith("s3://"):
        return _retry(url, lambda: _open_s3(url, s3_endpoint_url))
    try:
        return open(url.removeprefix("file://"), "rb")
    except OSError as exc:
        raise SourceError(f"{url}: {exc.strerror or exc}") from None


def _retry(url: str, opener):
    delay = BACKOFF_SECONDS
    for attempt in range(1, RETRIES + 1):
        try:
            return opener()
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429 or attempt == RETRIES:
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

    bucket, _, key = url[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    return client.get_object(Bucket=bucket, Key=key)["Body"]


def read_json(url: str, **open_args) -> dict:
    with open_url(url, **open_args) as f:
        data = f.read()
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{url}: not valid JSON ({exc})") from None


def resolve(spec: str | list[str], allow_pipe: bool = False,
            s3_endpoint_url: str | None = None) -> ShardList:
    """Shards and their lengths from a folder/URL holding index.json, an index.json itself,
    or shard paths/URLs and brace patterns (``shard-{000000..000009}.tar``) whose folder
    holds index.json. Lengths always come from the index: planning needs them."""
    open_args = {"allow_pipe": allow_pipe, "s3_endpoint_url": s3_endpoint_url}
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    lengths: list[tuple[int, ...]] = []
    rate = None
    indexes: dict[str, dict] = {}
    for item in specs:
        expanded = list(braceexpand.braceexpand(item))
        for url in expanded:
            if url.endswith(INDEX_NAME):
                base, names = _parent(url), None
            elif url.endswith(".tar") or url.startswith("pipe:"):
                base, names = _parent(url), [url.rsplit("/", 1)[-1]]
            else:
                base, names = url.rstrip("/"), None
            if base not in indexes:
                indexes[base] = _load_index(_join(base, INDEX_NAME), open_args)
            index = indexes[base]
            by_name = {e["file"]: e for e in index["shards"]}
            for name in names or [e["file"] for e in index["shards"]]:
                if name not in by_name:
                    raise SourceError(f"{_join(base, name)}: not listed in {base}/{INDEX_NAME}")
                urls.append(url if names else _join(base, name))
                lengths.append(tuple(int(n) for n in by_name[name]["num_samples"]))
            if rate not in (None, index["sample_rate"]):
                raise SourceError(f"{base}: sample rate {index['sample_rate']} differs from "
                                  f"the other shards' {rate}")
            rate = index["sample_rate"]
    if not urls:
        raise SourceError(f"{spec}: no shards")
    return ShardList(tuple(urls), tuple(lengths), int(rate))


def _load_index(url: str, open_args: dict) -> dict:
    if not url.startswith(REMOTE_SCHEMES) and not Path(url).exists():
        raise SourceError(f"{url}: no index.json; shards need one (tools/make_shards.py "
                          f"writes it)")
    index = read_json(url, **open_args)
    if index.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{url}: not a w2v_stream shard index")
    return index
