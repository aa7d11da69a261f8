"""fetch(): resumable, checksum-verified downloads, against a local HTTP server only."""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conkd_scale.data.fetch import SOURCES, SUMS_FILE, Source, fetch
from conkd_scale.utils.errors import ConfigError, DataError

DATA = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass
class Request:
    path: str
    range: str | None
    sent: int  # body bytes sent


@dataclass
class Site:
    base: str
    files: dict[str, bytes]
    log: list[Request] = field(default_factory=list)
    cut_next: int | None = None  # send only this many body bytes of the next response
    ignore_range: bool = False  # act like a server without Range support

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


class RangeHandler(BaseHTTPRequestHandler):
    """Serves ``site.files``; honours ``Range: bytes=N-[M]`` with 206 / 416."""

    site: Site

    def do_GET(self) -> None:
        site = self.site
        data = site.files.get(self.path)
        rng = self.headers.get("Range")
        if data is None:
            site.log.append(Request(self.path, rng, 0))
            self.send_error(404, "Not Found")
            return
        start, end = 0, len(data) - 1
        status = 200
        if rng is not None and not site.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            assert m is not None, rng
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else end
            if start >= len(data):
                site.log.append(Request(self.path, rng, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start : end + 1]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if site.cut_next is not None:
            body, site.cut_next = body[: site.cut_next], None
        # Logged before the body goes out: a client that has read a complete body may
        # check the log before this thread would run again.
        site.log.append(Request(self.path, rng, len(body)))
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def site() -> Iterator[Site]:
    handler = type("Handler", (RangeHandler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    s = Site(f"http://127.0.0.1:{server.server_address[1]}", {"/data.bin": DATA})
    handler.site = s
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield s
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _one(site: Site, path: str = "/data.bin", sha: str | None = SHA) -> dict[str, list[Source]]:
    return {"toy": [Source(site.url(path), "data.bin", sha, None)]}


def test_full_download_and_checksum(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = fetch("toy", out, sources=_one(site), progress=True)
    assert paths == [out / "data.bin"]
    assert (out / "data.bin").read_bytes() == DATA
    assert not (out / "data.bin.part").exists()
    assert [(r.range, r.sent) for r in site.log] == [(None, len(DATA))]
    # A verified file in place is not downloaded again.
    assert fetch("toy", out, sources=_one(site), progress=False) == paths
    assert len(site.log) == 1


def test_resume_from_partial_file(site: Site, tmp_path: Path) -> None:
    (tmp_path / "data.bin.part").write_bytes(DATA[:100_000])
    fetch("toy", tmp_path, sources=_one(site), progress=False)
    assert (tmp_path / "data.bin").read_bytes() == DATA
    assert [(r.range, r.sent) for r in site.log] == [("bytes=100000-", len(DATA) - 100_000)]


def test_interrupted_download_resumes(site: Site, tmp_path: Path) -> None:
    site.cut_next = 120_000
    with pytest.raises(ConnectionError, match="resume"):
        fetch("toy", tmp_path, sources=_one(site), progress=False)
    assert not (tmp_path / "data.bin").exists()
    assert (tmp_path / "data.bin.part").stat().st_size == 120_000
    fetch("toy", tmp_path, sources=_one(site), progress=False)
    assert (tmp_path / "data.bin").read_bytes() == DATA
    assert site.log[-1].range == "bytes=120000-"
    assert site.log[-1].sent == len(DATA) - 120_000


def test_server_without_range_support_starts_over(site: Site, tmp_path: Path) -> None:
    site.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(b"stale bytes that do not match")
    fetch("toy", tmp_path, sources=_one(site), progress=False)
    assert (tmp_path / "data.bin").read_bytes() == DATA


def test_complete_part_file_gets_416_and_is_verified(site: Site, tmp_path: Path) -> None:
    (tmp_path / "data.bin.part").write_bytes(DATA)
    fetch("toy", tmp_path, sources=_one(site), progress=False)
    assert (tmp_path / "data.bin").read_bytes() == DATA
    assert [(r.range, r.sent) for r in site.log] == [(f"bytes={len(DATA)}-", 0)]


def test_checksum_mismatch(site: Site, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="SHA-256 mismatch") as e:
        fetch("toy", tmp_path, sources=_one(site, sha="0" * 64), progress=False)
    assert site.url("/data.bin") in str(e.value) and "run fetch again" in str(e.value)
    assert not (tmp_path / "data.bin").exists()
    assert not (tmp_path / "data.bin.part").exists()
    # A corrupt file already in place is reported, not silently used or replaced.
    (tmp_path / "data.bin").write_bytes(b"corrupt")
    with pytest.raises(DataError, match="delete it"):
        fetch("toy", tmp_path, sources=_one(site), progress=False)


def test_http_404(site: Site, tmp_path: Path) -> None:
    with pytest.raises(ConnectionError) as e:
        fetch("toy", tmp_path, sources=_one(site, "/missing.bin"), progress=False)
    msg = str(e.value)
    assert "HTTP 404" in msg and site.url("/missing.bin") in msg
    assert (
        "no network? download the files elsewhere and copy data.bin into" in msg
        and str(tmp_path) in msg
    )
    assert not (tmp_path / "data.bin").exists()


def test_no_server(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = {"toy": [(f"http://127.0.0.1:{port}/x.bin", "x.bin", None, None)]}
    with pytest.raises(ConnectionError, match=r"cannot connect.*no network\?"):
        fetch("toy", tmp_path, sources=src, progress=False)


def test_zip_extraction(site: Site, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("redial/train_data.jsonl", '{"a": 1}\n')
        zf.writestr("redial/movies_with_mentions.csv", "movieId,movieName,nbMentions\r\n")
        zf.writestr("redial/README.txt", "ignored")
    blob = buf.getvalue()
    site.files["/redial.zip"] = blob
    members = ["train_data.jsonl", "movies_with_mentions.csv"]
    src = {"toy": [(site.url("/redial.zip"), "redial.zip", hashlib.sha256(blob).hexdigest(),
                    members)]}  # fmt: skip
    paths = fetch("toy", tmp_path, sources=src, progress=False)
    assert paths == [tmp_path / m for m in members]
    assert (tmp_path / "train_data.jsonl").read_text() == '{"a": 1}\n'
    assert not (tmp_path / "README.txt").exists() and not (tmp_path / "redial").exists()
    # Extracted files that went missing are extracted again from the verified archive.
    (tmp_path / "train_data.jsonl").unlink()
    fetch("toy", tmp_path, sources=src, progress=False)
    assert (tmp_path / "train_data.jsonl").exists() and len(site.log) == 1
    # Members copied in by hand without the archive: nothing is downloaded.
    hand = tmp_path / "by_hand"
    hand.mkdir()
    for m in members:
        (hand / m).write_text("x")
    assert fetch("toy", hand, sources=src, progress=False) == [hand / m for m in members]
    assert len(site.log) == 1
    bad = {"toy": [(*src["toy"][0][:3], ["test_data.jsonl"])]}
    with pytest.raises(DataError, match=r"test_data\.jsonl"):
        fetch("toy", tmp_path, sources=bad, progress=False)


def test_unpublished_checksum_is_recorded_and_enforced(site: Site, tmp_path: Path) -> None:
    fetch("toy", tmp_path, sources=_one(site, sha=None), progress=False)
    assert (tmp_path / SUMS_FILE).read_text() == f"{SHA}  data.bin\n"
    (tmp_path / "data.bin").write_bytes(DATA[:-1] + bytes([DATA[-1] ^ 1]))  # changed since download
    with pytest.raises(DataError, match=f"expected {SHA}"):
        fetch("toy", tmp_path, sources=_one(site, sha=None), progress=False)
    (tmp_path / "data.bin").unlink()
    site.files["/data.bin"] = b"changed upstream"
    with pytest.raises(DataError, match=SUMS_FILE):
        fetch("toy", tmp_path, sources=_one(site, sha=None), progress=False)
    assert not (tmp_path / "data.bin").exists()


def test_source_table() -> None:
    assert set(SOURCES) == {"redial", "inspired"}
    (redial,) = SOURCES["redial"]
    assert redial.url == "https://github.com/ReDialData/website/raw/data/redial_dataset.zip"
    assert redial.sha256 == "b48756681ec6f84e0af36979c5e9baa21ea8d9e7036b8764ea9b787bb0baf69b"
    assert set(redial.extract or []) == {
        "train_data.jsonl",
        "test_data.jsonl",
        "movies_with_mentions.csv",
    }
    assert [s.filename for s in SOURCES["inspired"]] == ["train.tsv", "dev.tsv", "test.tsv"]
    assert all(isinstance(s, Source) and s.sha256 is None for s in SOURCES["inspired"])
    with pytest.raises(ConfigError, match="redial"):
        fetch("nope", "/nonexistent-never-created")
