"""URI resolution, allowed roots, retries with a real (flaky) fsspec filesystem, checksums."""

import hashlib
import os

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from manifests.schema import parse_entry
from pipeline.config import FetchConfig
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import Reject
from pipeline.stages.fetch import FetchImages, is_allowed, read_bytes, resolve_uri


class FlakyFileSystem(MemoryFileSystem):
    """A memory filesystem whose first `failures` opens raise a transient error."""

    protocol = "flaky"
    failures = 0
    opens = 0

    @classmethod
    def _strip_protocol(cls, path):
        if path.startswith("flaky://"):
            path = path[len("flaky://"):]
        return MemoryFileSystem._strip_protocol("memory://" + path)

    def _open(self, path, mode="rb", **kwargs):
        type(self).opens += 1
        if "r" in mode and type(self).opens <= type(self).failures:
            raise ConnectionError("connection reset by peer")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def asset_for(uri, manifest_uri, sha256=None):
    entry = parse_entry({"asset_id": "x", "uri": uri, "caption": "a cat", "license_id": "CC-BY-2.0",
                         **({"sha256": sha256} if sha256 else {})})
    return Asset(entry=entry, manifest_uri=manifest_uri, manifest_row=1)


def test_relative_uri_resolves_against_manifest_folder(tmp_path):
    assert resolve_uri("images/a.jpg", "/data/v1/m.jsonl") == "/data/v1/images/a.jpg"
    assert resolve_uri("../x/a.jpg", "s3://bucket/v1/m.jsonl") == "s3://bucket/x/a.jpg"
    assert resolve_uri("https://cdn/a.jpg", "/data/m.jsonl") == "https://cdn/a.jpg"


@pytest.mark.parametrize("url,ok", [
    ("/data/v1/images/a.jpg", True),
    ("/data/v1/../v2/a.jpg", False),
    ("/data/v10/a.jpg", False),  # prefix of the name is not a folder boundary
    ("file:///data/v1/a.jpg", True),
    ("https://cdn.vendor.com/v1/a.jpg", True),
    ("https://evil.com/cdn.vendor.com/v1/a.jpg", False),
    ("ftp://cdn.vendor.com/v1/a.jpg", False),
])
def test_allowed_roots(url, ok):
    roots = ("/data/v1", "https://cdn.vendor.com/v1/")
    assert is_allowed(url, roots, FetchConfig().allowed_schemes)[0] is ok


def test_symlink_escape_is_refused(tmp_path):
    root = tmp_path / "delivery"
    root.mkdir()
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.jpg")
    assert not is_allowed(str(root / "link.jpg"), (str(root),), ("file",))[0]


def test_transient_errors_are_retried_with_backoff():
    fs = FlakyFileSystem()
    fs.pipe("/bucket/a.jpg", b"payload")
    FlakyFileSystem.failures, FlakyFileSystem.opens = 2, 0
    sleeps = []
    assert read_bytes("flaky://bucket/a.jpg", FetchConfig(retries=3, backoff_s=0.1), sleep=sleeps.append) == b"payload"
    assert sleeps == [0.1, 0.2]
    FlakyFileSystem.failures, FlakyFileSystem.opens = 10, 0
    with pytest.raises(Reject) as err:
        read_bytes("flaky://bucket/a.jpg", FetchConfig(retries=2, backoff_s=0.1), sleep=lambda s: None)
    assert err.value.reason == RejectReason.FETCH_FAILED and "3 attempts" in err.value.detail
    FlakyFileSystem.failures = 0


def test_missing_and_oversized_are_final(tmp_path):
    with pytest.raises(Reject) as err:
        read_bytes(str(tmp_path / "nope.jpg"), FetchConfig(), sleep=lambda s: pytest.fail("no retry"))
    assert err.value.reason == RejectReason.FILE_NOT_FOUND
    (tmp_path / "big.bin").write_bytes(b"0" * 100)
    with pytest.raises(Reject) as err:
        read_bytes(str(tmp_path / "big.bin"), FetchConfig(max_bytes=10))
    assert err.value.reason == RejectReason.FETCH_FAILED


def test_reads_never_allocate_the_cap(tmp_path, monkeypatch):
    """read(n) allocates n bytes up front; asking for max_bytes + 1 (64 MiB) per image
    fragmented the workers' heaps. Reads ask for the object's size, or 1 MiB chunks."""
    import io

    from pipeline.stages import fetch

    asked: list[int] = []

    class Recording(io.BytesIO):
        def read(self, n=-1):
            asked.append(n)
            return super().read(n)

    payload = b"x" * 3_000_000
    assert fetch._read_capped(Recording(payload), 64 << 20) == payload  # no size known: chunks
    assert max(asked) <= fetch._CHUNK
    asked.clear()
    assert len(fetch._read_capped(Recording(payload), 2_500_000)) == 2_500_001  # over the cap
    assert max(asked) <= fetch._CHUNK
    (tmp_path / "a.bin").write_bytes(payload)
    with open(tmp_path / "a.bin", "rb") as handle:  # size known from the file
        assert fetch._read_capped(handle, 64 << 20) == payload
    # oversized objects on a remote filesystem are refused too
    fs = MemoryFileSystem()
    fs.pipe("/cap/big.bin", b"0" * 100)
    with pytest.raises(Reject) as err:
        read_bytes("memory://cap/big.bin", FetchConfig(max_bytes=10))
    assert err.value.reason == RejectReason.FETCH_FAILED and "max_bytes" in err.value.detail
    assert read_bytes("memory://cap/big.bin", FetchConfig(max_bytes=100)) == b"0" * 100


def test_fetch_stage_checksum_and_roots(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    fetch = FetchImages(FetchConfig())
    manifest = str(tmp_path / "m.jsonl")
    asset = fetch.handle(asset_for("a.jpg", manifest, good))
    assert asset.sha256 == good and asset.source_bytes == b"abc" and asset.source_size == 3
    with pytest.raises(Reject) as err:
        fetch.handle(asset_for("a.jpg", manifest, "0" * 64))
    assert err.value.reason == RejectReason.CHECKSUM_MISMATCH
    with pytest.raises(Reject) as err:
        fetch.handle(asset_for("../a.jpg", manifest))
    assert err.value.reason == RejectReason.URI_NOT_ALLOWED
