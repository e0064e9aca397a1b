"""URI resolution, allowed roots, retries with a real (flaky) fsspec filesystem, checksums."""

import hashlib
import os
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from manifests.schema import parse_entry
from pipeline.config import FetchConfig
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import Reject
from pipeline.stages.fetch import FetchImages, is_allowed, read_bytes, resolve_uri

ROOT = Path(__file__).resolve().parents[2]


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
    assert is_allowed(url, roots, FetchConfig().schemes())[0] is ok


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


# -- backends: http(s) in the base install, object stores as extras --------------------------------


@pytest.fixture()
def http_server(tmp_path):
    """A loopback HTTP server over `tmp_path` that counts the requests for each path."""
    import functools
    import http.server
    import threading

    hits: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits[self.path] = hits.get(self.path, 0) + 1
            super().do_GET()

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "dir": tmp_path, "hits": hits}
    server.shutdown()
    server.server_close()


def test_http_works_on_the_base_install_and_a_404_is_not_retried(http_server):
    photo = sorted((ROOT / "manifests" / "demo" / "images").glob("*.jpg"))[0]
    (http_server["dir"] / "a.jpg").write_bytes(photo.read_bytes())
    cfg = FetchConfig(retries=3, backoff_s=0.0)
    assert {"http", "https"} <= set(cfg.schemes())
    assert read_bytes(f"{http_server['url']}/a.jpg", cfg) == photo.read_bytes()
    with pytest.raises(Reject) as rej:
        read_bytes(f"{http_server['url']}/missing.jpg", cfg)
    assert rej.value.reason == RejectReason.FILE_NOT_FOUND
    assert http_server["hits"]["/missing.jpg"] == 1  # permanent: one request, no retries


def test_http_delivery_through_a_real_run(http_server, tmp_path):
    import json

    from pipeline import ledger
    from pipeline.config import AlignConfig, RunConfig
    from pipeline.run import run

    allowed = {"CC-BY-2.0", "CC-BY-SA-2.0", "CC-BY-NC-2.0", "CC-BY-NC-SA-2.0"}  # the demo policy's
    rows = [json.loads(line) for line in (ROOT / "manifests" / "demo" / "coco.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["license_id"] in allowed][:3]
    for r in rows:
        (http_server["dir"] / os.path.basename(r["uri"])).write_bytes((ROOT / "manifests" / "demo" / r["uri"]).read_bytes())
        r["uri"] = f"{http_server['url']}/{os.path.basename(r['uri'])}"
    rows.append({**rows[0], "asset_id": "gone", "uri": f"{http_server['url']}/gone.jpg", "sha256": None})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(manifests=(str(manifest),), policy=str(ROOT / "manifests" / "demo" / "policy.yaml"),
                    out=str(tmp_path / "out"), align=AlignConfig(enabled=False),
                    fetch=FetchConfig(allowed_roots=(http_server["url"] + "/",)))
    run(cfg, until="curated", beam_flags=["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    by_id = {r["asset_id"]: r for r in ledger.read_ledger(str(tmp_path / "out")).to_pylist()}
    assert by_id["gone"]["reason"] == "FILE_NOT_FOUND" and http_server["hits"]["/gone.jpg"] == 1
    assert [by_id[r["asset_id"]]["status"] for r in rows[:3]] == ["kept"] * 3  # fetched over http, decoded, kept
    assert all(http_server["hits"][f"/{os.path.basename(r['uri'])}"] == 1 for r in rows[:3])


def test_a_scheme_without_its_backend_is_a_config_error_not_a_retry(tmp_path):
    from pipeline.config import ConfigError, RunConfig, missing_backend
    from pipeline.run import run

    missing = [s for s in ("s3", "gs", "az") if missing_backend(s)]
    if not missing:
        pytest.skip("every object-store backend is installed here")  # a dev box with cm3curate[all]
    scheme = missing[0]
    assert scheme not in FetchConfig().schemes()  # the default never allows a scheme it cannot open
    with pytest.raises(ConfigError, match=rf"fetch.allowed_schemes lists '{scheme}'.*pip install 'cm3curate\["):
        FetchConfig(allowed_schemes=("file", scheme))
    ok, why = is_allowed(f"{scheme}://bucket/a.jpg", (f"{scheme}://bucket",), FetchConfig().schemes())
    assert not ok and "pip install 'cm3curate[" in why  # a row using it: a clear reason, at once
    cfg = RunConfig(manifests=(f"{scheme}://vendor/manifest.jsonl",), policy=str(ROOT / "manifests" / "demo" / "policy.yaml"),
                    out=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=rf"manifest {scheme}://vendor/manifest.jsonl: {scheme}:// needs"):
        run(cfg, until="curated")
