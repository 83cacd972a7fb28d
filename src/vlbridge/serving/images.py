"""Images of a request: data: URLs always; http(s) URLs and local files only where the server's policy
(--allow-remote-images, --allow-path) lets them."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vlbridge.core.images import ImageError, load_image
from vlbridge.serving.schemas import APIError


@dataclass
class ImagePolicy:
    """Where images may come from besides data: URLs. allow_remote: fetch http(s) URLs (timeout_s, at
    most max_bytes); allow_paths: directories whose files may be named by file:// URLs or plain paths."""

    allow_remote: bool = False
    allow_paths: tuple[Path, ...] = ()
    timeout_s: float = 10.0
    max_bytes: int = 20 * 2**20


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    """The bytes at an http(s) URL, within the policy's timeout and byte limit."""
    try:
        with urllib.request.urlopen(url, timeout=policy.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise APIError(400, f"image_url: {url} is over the limit of {policy.max_bytes} bytes", "messages")
            raw = response.read(policy.max_bytes + 1)
    except APIError:
        raise
    except Exception as e:  # HTTP errors, timeouts, refused connections, bad URLs
        raise APIError(400, f"image_url: could not fetch {url} ({e})", "messages") from None
    if len(raw) > policy.max_bytes:
        raise APIError(400, f"image_url: {url} is over the limit of {policy.max_bytes} bytes", "messages")
    return raw


def _local_file(url: str, policy: ImagePolicy) -> Path:
    """A file:// URL or a plain path, resolved; refused unless it lies inside an --allow-path directory."""
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    if not policy.allow_paths:
        raise APIError(
            400,
            "image_url.url must be a data URL (data:image/png;base64,...); local files need --allow-path",
            "messages",
        )
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(d) for d in policy.allow_paths):
        raise APIError(
            400, f"image_url: {path} is outside the directories this server reads (--allow-path)", "messages"
        )
    if not resolved.is_file():
        raise APIError(400, f"image_url: {path} is not a file", "messages")
    return resolved


def decode_image(url: str, max_pixels: int | None, policy: ImagePolicy | None = None):
    """A data: URL -> RGB PIL image; http(s) URLs only with policy.allow_remote, file:// URLs and plain
    paths only inside policy.allow_paths."""
    policy = policy or ImagePolicy()
    if url.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise APIError(
                400,
                "remote image URLs are not fetched (the server runs without --allow-remote-images): "
                "send the image as data:image/...;base64,...",
                "messages",
            )
        raw, name = _fetch(url, policy), url
    elif url.startswith("data:"):
        m = re.fullmatch(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", url, flags=re.S)
        if m is None or ";base64" not in m.group(2):
            raise APIError(400, "image_url.url must be a data URL: data:image/png;base64,...", "messages")
        try:
            raw = base64.b64decode(m.group(3), validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"image_url: not valid base64 ({e})", "messages") from None
        name = "image_url"
    else:
        path = _local_file(url, policy)
        raw, name = path.read_bytes(), str(path)
    try:
        return load_image(raw, name=name, max_pixels=max_pixels)
    except ImageError as e:
        raise APIError(400, str(e), "messages") from None
