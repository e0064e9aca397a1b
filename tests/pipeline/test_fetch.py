"""URI resolution, allowed roots, retries with a real (flaky) fsspec filesystem, checksums."""

import hashlib
import os
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from manifests.schema import parse_entry
from pipeline.config import FetchConfig
from pipeline.fetch_client import read_bytes
from pipeline.fetch_urls import is_allowed, resolve_uri
from pipeline.records import Asset, RejectReason
from pipeline.stages.base import Reject
from pipeline.stages.fetch import FetchImages

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

    from pipeline import fetch_client

    asked: list[int] = []

    class Recording(io.BytesIO):
        def read(self, n=-1):
            asked.append(n)
            return super().read(n)

    payload = b"x" * 3_000_000
    assert fetch_client._read_capped(Recording(payload), 64 << 20) == payload  # no size known: chunks
    assert max(asked) <= fetch_client._CHUNK
    asked.clear()
    assert len(fetch_client._read_capped(Recording(payload), 2_500_000)) == 2_500_001  # over the cap
    assert max(asked) <= fetch_client._CHUNK
    (tmp_path / "a.bin").write_bytes(payload)
    with open(tmp_path / "a.bin", "rb") as handle:  # size known from the file
        assert fetch_client._read_capped(handle, 64 << 20) == payload
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
    """A loopback HTTP server over `tmp_path` (tests/loopback.py) that counts the requests for each path."""
    from loopback import LoopbackServer

    with LoopbackServer(tmp_path) as server:
        yield {"url": server.url, "dir": tmp_path, "hits": server.hits, "server": server}


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


def test_a_scheme_without_its_backend_is_a_config_error_not_a_retry(tmp_path, monkeypatch):
    """s3's backend is made absent by pointing the scheme table at a module no box has, so the test
    runs the same with or without cm3curate[s3] installed (it never skips)."""
    from pipeline.config import SCHEME_BACKENDS, ConfigError, RunConfig, missing_backend
    from pipeline.run import run

    scheme = "s3"
    with monkeypatch.context() as patch:
        patch.setitem(SCHEME_BACKENDS, scheme, ("cm3curate_absent_backend", "s3"))
        missing_backend.cache_clear()
        try:
            assert missing_backend(scheme) == \
                "s3:// needs the cm3curate_absent_backend package: pip install 'cm3curate[s3]'"
            assert scheme not in FetchConfig().schemes()  # the default never allows a scheme it cannot open
            with pytest.raises(ConfigError, match=rf"fetch.allowed_schemes lists '{scheme}'.*pip install 'cm3curate\["):
                FetchConfig(allowed_schemes=("file", scheme))
            ok, why = is_allowed(f"{scheme}://bucket/a.jpg", (f"{scheme}://bucket",), FetchConfig().schemes())
            assert not ok and "pip install 'cm3curate[" in why  # a row using it: a clear reason, at once
            cfg = RunConfig(manifests=(f"{scheme}://vendor/manifest.jsonl",),
                            policy=str(ROOT / "manifests" / "demo" / "policy.yaml"), out=str(tmp_path / "out"))
            with pytest.raises(ConfigError, match=rf"manifest {scheme}://vendor/manifest.jsonl: {scheme}:// needs"):
                run(cfg, until="curated")
        finally:
            missing_backend.cache_clear()  # later tests see the real table again


# -- errors classified, on a real loopback server (tests/loopback.py) -------------------------------


def _photo_bytes(i: int = 0) -> bytes:
    return sorted((ROOT / "manifests" / "demo" / "images").glob("*.jpg"))[i].read_bytes()


def _fetch(url, cfg, roots):
    """FetchImages.fetch + finish as the prepare step calls them, with the sleeps recorded."""
    from collections import Counter

    sleeps = []
    fetch = FetchImages(cfg)
    asset = asset_for(url, roots[0] + "manifest.jsonl")
    fetched = fetch.fetch(asset, sleep=sleeps.append)
    return fetched, sleeps, Counter(fetched.retried)


@pytest.mark.parametrize("faults, reason, requests, retried", [
    (["500", "500"], None, 3, {"http_500": 2}),
    (["429"], None, 2, {"http_429": 1}),
    (["503", "reset"], None, 3, {"http_503": 1, "connection": 1}),
    (["404"], "FILE_NOT_FOUND", 1, {}),
    (["403"], "ACCESS_DENIED", 1, {}),
    (["410"], "FILE_NOT_FOUND", 1, {}),
    (["500"] * 5, "FETCH_FAILED", 3, {"http_500": 2}),
    (["reset"] * 5, "FETCH_FAILED", 3, {"connection": 2}),
])
def test_each_fault_gets_its_reason_and_transient_ones_are_retried_and_counted(http_server, faults, reason, requests,
                                                                               retried):
    (http_server["dir"] / "a.jpg").write_bytes(_photo_bytes())
    http_server["server"].faults["/a.jpg"] = list(faults)
    cfg = FetchConfig(retries=2, backoff_s=0.01, max_backoff_s=0.02)
    fetched, sleeps, counted = _fetch(f"{http_server['url']}/a.jpg", cfg, (http_server["url"] + "/",))
    assert http_server["hits"]["/a.jpg"] == requests  # permanent: exactly one request
    assert counted == retried and len(sleeps) == sum(retried.values())
    if reason is None:
        assert fetched.error is None and fetched.data == _photo_bytes()
    else:
        assert isinstance(fetched.error, Reject) and fetched.error.reason.value == reason


def test_retry_after_is_honoured_up_to_max_backoff(http_server):
    (http_server["dir"] / "a.jpg").write_bytes(_photo_bytes())
    server = http_server["server"]
    server.faults["/a.jpg"] = ["429"]
    original = server._reply

    def reply(req, status, data, headers=None, length=None):  # this 429 asks for 30 s
        return original(req, status, data, {**(headers or {}), "Retry-After": "30"} if status == 429 else headers, length)

    server._reply = reply
    fetched, sleeps, _ = _fetch(f"{http_server['url']}/a.jpg", FetchConfig(backoff_s=0.1, max_backoff_s=4.0),
                                (http_server["url"] + "/",))
    assert fetched.error is None and sleeps == [4.0]  # the server's wish, capped by max_backoff_s


def _bounded(fn, seconds=60.0):
    """Run fn in a thread: a hang fails the test instead of stalling the suite."""
    import threading

    box = {}
    thread = threading.Thread(target=lambda: box.update(result=fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the fetch blocked"
    return box["result"]


def test_a_server_that_never_answers_or_trickles_cannot_hold_a_worker(http_server):
    (http_server["dir"] / "a.jpg").write_bytes(_photo_bytes())
    (http_server["dir"] / "b.jpg").write_bytes(_photo_bytes())
    server = http_server["server"]
    server.faults["/a.jpg"] = ["hang"] * 5
    server.faults["/b.jpg"] = ["trickle"] * 5
    roots = (http_server["url"] + "/",)
    cfg = FetchConfig(retries=1, backoff_s=0.0, read_timeout_s=0.3, timeout_s=1.0)
    for name, kind in (("a.jpg", "timeout"), ("b.jpg", "timeout")):
        fetched, _, counted = _bounded(lambda: _fetch(f"{http_server['url']}/{name}", cfg, roots))
        assert fetched.error.reason == RejectReason.FETCH_FAILED
        assert ("timed out" if name == "a.jpg" else "within fetch.timeout_s") in fetched.error.detail
        assert counted == {kind: 1} and server.hits[f"/{name}"] == 2  # one attempt + one retry, then given up


# -- the fetcher as an attacker sees it --------------------------------------------------------------


def test_redirects_are_checked_at_every_hop(http_server, tmp_path_factory):
    from loopback import LoopbackServer

    root = http_server["dir"] / "delivery"
    root.mkdir()
    (root / "a.jpg").write_bytes(_photo_bytes(0))
    (http_server["dir"] / "secret.jpg").write_bytes(b"outside the root")
    url, server = http_server["url"], http_server["server"]
    roots = (f"{url}/delivery/",)
    with LoopbackServer(tmp_path_factory.mktemp("other")) as other:
        (other.folder / "delivery").mkdir()
        (other.folder / "delivery" / "a.jpg").write_bytes(b"internal host")
        server.faults = {
            "/delivery/x1.jpg": [f"redirect:{other.url}/delivery/a.jpg"],  # another port
            "/delivery/x2.jpg": ["redirect:/secret.jpg"],  # a path outside the root
            "/delivery/x3.jpg": ["redirect:../secret.jpg"],  # relative, outside the root
            "/delivery/x4.jpg": ["redirect:/delivery/a.jpg"],  # inside the root: followed
            "/delivery/x5.jpg": ["redirect:http://169.254.169.254/latest/meta-data/"],
        }
        cfg = FetchConfig(backoff_s=0.0)
        outcomes = {n: _fetch(f"{url}/delivery/{n}", cfg, roots)[0] for n in ("x1.jpg", "x2.jpg", "x3.jpg", "x4.jpg",
                                                                             "x5.jpg")}
        assert other.hits == {}  # never contacted
    for name in ("x1.jpg", "x2.jpg", "x3.jpg", "x5.jpg"):
        assert outcomes[name].error.reason == RejectReason.URI_NOT_ALLOWED, name
        assert "redirect" in outcomes[name].error.detail
    assert "/secret.jpg" not in server.hits
    assert outcomes["x4.jpg"].error is None and outcomes["x4.jpg"].data == _photo_bytes(0)
    server.faults["/delivery/loop.jpg"] = ["redirect:/delivery/loop.jpg"] * 10
    looped = _fetch(f"{url}/delivery/loop.jpg", FetchConfig(max_redirects=3), roots)[0]
    assert looped.error.reason == RejectReason.FETCH_FAILED and "max_redirects" in looped.error.detail
    assert server.hits["/delivery/loop.jpg"] == 4


@pytest.mark.parametrize("path", ["/delivery/%2e%2e/secret.jpg", "/delivery/%2E%2E/secret.jpg",
                                  "/delivery/..%2fsecret.jpg", "/delivery/.%2e/secret.jpg",
                                  "/delivery/..%5csecret.jpg", "/delivery/%00.jpg"])
def test_percent_encoded_escapes_are_refused_before_any_request(http_server, path):
    (http_server["dir"] / "delivery").mkdir()
    (http_server["dir"] / "secret.jpg").write_bytes(b"outside the root")
    fetched = _fetch(f"{http_server['url']}{path}", FetchConfig(), (f"{http_server['url']}/delivery/",))[0]
    assert fetched.error.reason == RejectReason.URI_NOT_ALLOWED
    assert http_server["hits"] == {}


def test_the_url_requested_is_the_url_checked(http_server):
    (http_server["dir"] / "delivery" / "sub").mkdir(parents=True)
    (http_server["dir"] / "delivery" / "a b.jpg").write_bytes(_photo_bytes(0))
    url = http_server["url"]
    fetched = _fetch(f"{url}/delivery/sub/%2e%2e/a%20b.jpg", FetchConfig(), (f"{url}/delivery/",))[0]
    assert fetched.data == _photo_bytes(0)
    assert list(http_server["hits"]) == ["/delivery/a%20b.jpg"]  # normalised before the request


def test_credentials_never_reach_the_ledger_or_logs(http_server, tmp_path, caplog):
    import base64
    import json
    import logging

    from pipeline import ledger
    from pipeline.config import AlignConfig, RunConfig
    from pipeline.run import run

    (http_server["dir"] / "a.jpg").write_bytes(_photo_bytes(0))
    server, url = http_server["server"], http_server["url"]
    server.faults["/b.jpg?X-Amz-Signature=s3cr3tsig&X-Amz-Credential=AKIAEXAMPLE"] = ["500"] * 10
    host = url.split("//", 1)[1]
    row = {"caption": "a photo of a street", "license_id": "CC-BY-2.0", "allowed_uses": ["ml-training"]}
    rows = [{**row, "asset_id": "basic", "uri": f"http://vendor:hunter2pw@{host}/a.jpg"},
            {**row, "asset_id": "presigned", "uri": f"{url}/b.jpg?X-Amz-Signature=s3cr3tsig&X-Amz-Credential=AKIAEXAMPLE"},
            {**row, "asset_id": "missing", "uri": f"http://vendor:hunter2pw@{host}/gone.jpg"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = RunConfig(manifests=(str(manifest),), policy=str(ROOT / "manifests" / "demo" / "policy.yaml"),
                    out=str(out), align=AlignConfig(enabled=False),
                    fetch=FetchConfig(allowed_roots=(url + "/",), retries=1, backoff_s=0.0))
    with caplog.at_level(logging.DEBUG):
        run(cfg, until="curated", beam_flags=["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    by_id = {r["asset_id"]: r for r in ledger.read_ledger(str(out)).to_pylist()}
    assert by_id["basic"]["status"] == "kept"  # the credentials were used ...
    assert server.headers["/a.jpg"]["authorization"] == "Basic " + base64.b64encode(b"vendor:hunter2pw").decode()
    assert by_id["presigned"]["reason"] == "FETCH_FAILED" and by_id["missing"]["reason"] == "FILE_NOT_FOUND"
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for secret in (b"hunter2pw", b"s3cr3tsig"):  # ... and are nowhere in the outputs or logs
        assert secret not in written
        assert secret.decode() not in caplog.text
    assert by_id["basic"]["uri"] == f"http://vendor:***@{host}/a.jpg"


def test_fifo_and_directory_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # nobody ever writes to it: a blocking open would never return
    (tmp_path / "dir.jpg").mkdir()
    for name in ("pipe.jpg", "dir.jpg"):
        fetched = _bounded(lambda: _fetch(name, FetchConfig(), (str(tmp_path) + "/",))[0], 30)
        assert fetched.error.reason == RejectReason.NOT_A_FILE, name


# -- concurrent fetch through real runs ---------------------------------------------------------------


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file a curated run leaves (its run record aside), by relative path."""
    skip = ("run.json", "croissant.json", "_state", "_logs", "lineage", "report")  # run records: times, paths
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not str(p.relative_to(out)).startswith(skip)}


def test_concurrency_1_and_16_give_byte_identical_outputs_under_faults(tmp_path):
    import json

    from loopback import LoopbackServer

    from pipeline import ledger
    from pipeline.config import AlignConfig, CuratedConfig, RunConfig
    from pipeline.run import run

    allowed = {"CC-BY-2.0", "CC-BY-SA-2.0", "CC-BY-NC-2.0", "CC-BY-NC-SA-2.0"}  # the demo policy's
    rows = [json.loads(line) for line in (ROOT / "manifests" / "demo" / "coco.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["license_id"] in allowed][:40]
    served = tmp_path / "served"
    served.mkdir()
    for r in rows:
        (served / os.path.basename(r["uri"])).write_bytes((ROOT / "manifests" / "demo" / r["uri"]).read_bytes())
    faults = {0: ["500"], 1: ["429", "503"], 2: ["reset"], 3: ["404"], 4: ["403"], 5: ["500"] * 9, 6: ["hang"] * 9}
    results = {}
    with LoopbackServer(served, latency_s=0.02) as server:
        for r in rows:
            r["uri"] = f"{server.url}/{os.path.basename(r['uri'])}"
        manifest = tmp_path / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for concurrency in (1, 16):
            server.faults = {"/" + os.path.basename(rows[i]["uri"]): list(f) for i, f in faults.items()}
            out = tmp_path / f"out-{concurrency}"
            cfg = RunConfig(manifests=(str(manifest),), policy=str(ROOT / "manifests" / "demo" / "policy.yaml"),
                            out=str(out), align=AlignConfig(enabled=False), curated=CuratedConfig(chunk_rows=15),
                            fetch=FetchConfig(allowed_roots=(server.url + "/",), concurrency=concurrency,
                                              retries=2, backoff_s=0.0, read_timeout_s=0.5))
            report = run(cfg, until="curated", beam_flags=["--direct_running_mode=multi_processing",
                                                          "--direct_num_workers=2"])
            results[concurrency] = (_outputs(out), report.counters, ledger.read_ledger(str(out)).to_pylist())
    (files_1, counters_1, ledger_1), (files_16, counters_16, _) = results[1], results[16]
    assert files_1 == files_16  # the store, metadata and ledger, byte for byte
    retries = {k: v for k, v in counters_1.items() if k.startswith("fetch/retries/")}
    assert retries == {k: v for k, v in counters_16.items() if k.startswith("fetch/retries/")}
    assert retries == {"fetch/retries/http_500": 1 + 2, "fetch/retries/http_429": 1, "fetch/retries/http_503": 1,
                       "fetch/retries/connection": 1, "fetch/retries/timeout": 2}
    by_id = {r["asset_id"]: r for r in ledger_1}
    assert len(ledger_1) == len(rows)  # no row lost (the run also checked the invariant)
    expected = {3: "FILE_NOT_FOUND", 4: "ACCESS_DENIED", 5: "FETCH_FAILED", 6: "FETCH_FAILED"}
    for i, reason in expected.items():
        assert by_id[rows[i]["asset_id"]]["reason"] == reason
    for i in (0, 1, 2):  # recovered after their retries
        assert by_id[rows[i]["asset_id"]]["stage"] != "fetch"
