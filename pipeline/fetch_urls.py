"""Which URLs the fetcher may read (`pipeline.fetch_client`, `pipeline.stages.fetch`): relative
manifest URIs resolved against the manifest's folder, and the allowed-roots check.

Allowed roots are compared on the decoded, normalised URL (`%2e%2e` is `..`, symlinks of local
paths resolved), and the URL requested is the one that was checked. Credentials in a URL never
reach a reason (`storage.redact_url`).
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import unquote, urlsplit

from pipeline.config import missing_backend
from pipeline.storage import redact_url

DEFAULT_PORTS = {"http": 80, "https": 443}


def http_parts(url: str) -> tuple[str, str, int, str, str, str | None]:
    """(scheme, host, port, decoded normalised path, query, userinfo) of an http(s) URL.

    Raises ValueError for what cannot be checked safely: no host, a bad port, a NUL or
    control character, or a backslash (some servers read it as `/`) in the decoded path.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError("no host")
    port = parts.port or DEFAULT_PORTS[scheme]  # .port raises ValueError for a bad port
    path = unquote(parts.path or "/")
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError("a backslash or control character in the path")
    path = "/" + posixpath.normpath(path).lstrip("/")
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else None
    return scheme, host, port, path, parts.query, userinfo


def split_url(url: str) -> tuple[str, str]:
    """(scheme, comparable path): local paths as scheme 'file' with symlinks resolved; http(s)
    as `host:port/path` with the path percent-decoded and normalised; others normalised."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        scheme = scheme.lower()
        if scheme == "file":
            return "file", os.path.realpath(rest or "/")
        if scheme in DEFAULT_PORTS:
            _, host, port, path, _, _ = http_parts(url)
            return scheme, f"{host}:{port}{path}"
        return scheme, posixpath.normpath("/" + rest).lstrip("/") if scheme != "memory" else posixpath.normpath("/" + rest)
    return "file", os.path.realpath(url)


def resolve_uri(uri: str, manifest_uri: str) -> str:
    """An absolute URL stays; a relative one is joined to the manifest's folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    if "://" in base:
        scheme, path = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(path, uri))}"
    return os.path.normpath(os.path.join(base, uri))


def manifest_root(manifest_uri: str) -> str:
    return manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."


def is_allowed(url: str, roots: tuple[str, ...], schemes: tuple[str, ...]) -> tuple[bool, str]:
    """True when `url` uses an allowed scheme and lies under one of `roots` (after decoding,
    `..` and symlinks)."""
    try:
        scheme, path = split_url(url)
    except (ValueError, KeyError) as exc:
        return False, f"{redact_url(url)} cannot be checked: {exc}"
    if scheme not in schemes:
        why = missing_backend(scheme)
        return False, (f"scheme {scheme!r} has no backend installed here: {why}" if why
                       else f"scheme {scheme!r} is not in allowed_schemes")
    for root in roots:
        try:
            root_scheme, root_path = split_url(root)
        except (ValueError, KeyError):
            continue
        if root_scheme != scheme:
            continue
        prefix = root_path.rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            return True, ""
    return False, f"{redact_url(url)} is outside the allowed roots"
