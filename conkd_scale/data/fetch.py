"""Download the public datasets from their publishers, resumably and checksum-verified.

``fetch("redial", "data/redial")`` downloads each source file of the dataset into
``out_dir`` as ``<name>.part``, resuming an interrupted download with an HTTP ``Range``
request, verifies its SHA-256 and only then renames it into place (a file under its final
name is always complete and verified). Zip archives then have the listed members extracted
next to them (each written to a temp file and renamed).

Checksums: a published SHA-256 is checked directly. Sources without one (INSPIRED) are
trusted on first download: the digest is recorded in ``out_dir/SHA256SUMS`` and every later
run verifies the file against it. A file already in place is verified, not downloaded again.

Without network access (as on the project's build machines) copy the files into ``out_dir``
by hand; ``fetch`` then only verifies them (for an archive, its extracted members may be
copied instead; those are only checked for presence). The source table is overridable
(``sources=``), e.g. for a mirror or for tests.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from conkd_scale.utils.errors import ConfigError, DataError
from conkd_scale.utils.io import atomic_open, sha256_file

__all__ = ["SOURCES", "SUMS_FILE", "Source", "SourceSpec", "fetch", "sha256_file"]

SUMS_FILE = "SHA256SUMS"
CHUNK = 1 << 16
TIMEOUT_S = 60.0
USER_AGENT = "conkd_scale-fetch/0.1 (+python urllib)"


class Source(NamedTuple):
    """One file to download; a plain 4-tuple works as well."""

    url: str
    filename: str  # name under out_dir
    sha256: str | None  # published digest, or None (recorded in SHA256SUMS on first download)
    extract: list[str] | None  # zip members (matched by base name) to extract into out_dir


SourceSpec = Source | tuple[str, str, str | None, list[str] | None]

_INSPIRED = "https://raw.githubusercontent.com/sweetpeach/Inspired/master/data/dialog_data/{}.tsv"

SOURCES: dict[str, list[Source]] = {
    "redial": [
        Source(
            "https://github.com/ReDialData/website/raw/data/redial_dataset.zip",
            "redial_dataset.zip",
            "b48756681ec6f84e0af36979c5e9baa21ea8d9e7036b8764ea9b787bb0baf69b",
            ["train_data.jsonl", "test_data.jsonl", "movies_with_mentions.csv"],
        )
    ],
    "inspired": [
        Source(_INSPIRED.format(split), f"{split}.tsv", None, None)
        for split in ("train", "dev", "test")
    ],
}


def _read_sums(out_dir: Path) -> dict[str, str]:
    path = out_dir / SUMS_FILE
    sums: dict[str, str] = {}
    if not path.exists():
        return sums
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *]?(.+)", line.strip())
        if m is None:
            raise DataError(
                path, f"bad line {line!r}", line=n, hint="expected '<sha256>  <filename>'"
            )
        sums[m.group(2)] = m.group(1).lower()
    return sums


def _record_sum(out_dir: Path, filename: str, digest: str) -> None:
    sums = _read_sums(out_dir)
    sums[filename] = digest
    with atomic_open(out_dir / SUMS_FILE, "w", encoding="utf-8") as f:
        for name in sorted(sums):
            f.write(f"{sums[name]}  {name}\n")


def _by_hand(out_dir: Path, sources: list[Source]) -> str:
    names = [
        f"{s.filename} (or the files it holds: {', '.join(s.extract)})" if s.extract else s.filename
        for s in sources
    ]
    return f"no network? download the files elsewhere and copy {', '.join(names)} into {out_dir}"


def _open(url: str, start: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(req, timeout=TIMEOUT_S)


def _download(url: str, part: Path, *, progress: bool, hint: str) -> None:
    """Download ``url`` into ``part``, resuming from its current size if it exists."""
    from tqdm import tqdm

    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, start)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code != 416 or start == 0:
            raise ConnectionError(f"{url}: HTTP {e.code} {e.reason} ({hint})") from None
        # Range not satisfiable: the .part file is complete if its size is the remote size
        # (the checksum then decides); otherwise it is stale, so start over.
        m = re.fullmatch(r"bytes \*/(\d+)", (e.headers.get("Content-Range") or "").strip())
        if m is None or int(m.group(1)) == start:
            return
        part.unlink()
        _download(url, part, progress=progress, hint=hint)
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"{url}: cannot connect ({reason}) ({hint})") from None
    with resp:
        status = resp.status
        if status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != start:
                raise ConnectionError(
                    f"{url}: the server resumed at the wrong offset "
                    f"(Content-Range {resp.headers.get('Content-Range')!r}, wanted {start}); "
                    f"delete {part} and run fetch again"
                )
            mode = "ab"
        elif status == 200:
            start, mode = 0, "wb"  # the server ignored the Range header: start over
        else:
            raise ConnectionError(f"{url}: unexpected HTTP status {status} ({hint})")
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        total = start + expected if expected is not None else None
        got = 0
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            try:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise ConnectionError(
                    f"{url}: download interrupted after {start + got} bytes ({e!r}); "
                    f"run fetch again to resume from {part}"
                ) from None
        if expected is not None and got < expected:
            raise ConnectionError(
                f"{url}: connection closed after {start + got} of {total} bytes; "
                f"run fetch again to resume from {part}"
            )


def _extract(archive: Path, members: list[str], out_dir: Path) -> list[Path]:
    """Extract the zip members whose base name is in ``members`` into ``out_dir``."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise DataError(
            archive, f"not a valid zip file ({e})", hint="delete it and fetch again"
        ) from None
    out: list[Path] = []
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        for member in members:
            found = [n for n in names if n.rsplit("/", 1)[-1] == member]
            if len(found) != 1:
                raise DataError(
                    archive,
                    f"expected exactly one {member!r} in the archive, found {len(found)}",
                    hint=f"the archive holds: {', '.join(names[:20])}",
                )
            dest = out_dir / member  # base name only: no path from the archive is trusted
            with zf.open(found[0]) as src, atomic_open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            out.append(dest)
    return out


def fetch(
    dataset: str,
    out_dir: str | Path,
    *,
    sources: Mapping[str, Sequence[SourceSpec]] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download (or verify) ``dataset``'s files into ``out_dir``; return the data files.

    Returns the extracted members for archives and the downloaded file otherwise. Raises
    :class:`DataError` on a checksum mismatch or a bad archive and :class:`ConnectionError`
    (with the URL and what to do) on network and HTTP errors. A partial download is kept as
    ``<name>.part`` and resumed by the next call; a ``.part`` that fails its checksum is
    deleted.
    """
    table = SOURCES if sources is None else sources
    if dataset not in table:
        raise ConfigError(f"dataset: unknown {dataset!r}; known: {', '.join(sorted(table))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = [Source(*s) for s in table[dataset]]
    by_hand = _by_hand(out, entries)
    results: list[Path] = []
    for src in entries:
        final = out / src.filename
        part = out / f"{src.filename}.part"
        recorded = _read_sums(out).get(src.filename)
        want = src.sha256.lower() if src.sha256 else recorded
        fresh = False
        if src.extract and not final.exists() and all((out / m).exists() for m in src.extract):
            # The archive's contents were put here by hand: nothing to download (the members
            # have no published checksums of their own).
            results.extend(out / m for m in src.extract)
            continue
        if final.exists():
            got = sha256_file(final)
            if want is None:
                _record_sum(out, src.filename, got)  # copied in by hand: trust on first use
            elif got != want:
                raise DataError(
                    final,
                    f"SHA-256 mismatch: expected {want}, got {got}",
                    hint=f"the file is corrupt or changed; delete it to download it again "
                    f"from {src.url}"
                    + (f" (and its line in {SUMS_FILE})" if not src.sha256 else ""),
                )
        else:
            _download(src.url, part, progress=progress, hint=by_hand)
            got = sha256_file(part)
            if want is not None and got != want:
                part.unlink()
                raise DataError(
                    final,
                    f"SHA-256 mismatch for {src.url}: expected {want}, got {got}; "
                    "the partial file was deleted",
                    hint="run fetch again; if it persists, the file changed at the source"
                    + (
                        ""
                        if src.sha256
                        else f" (delete its line in {out / SUMS_FILE} to accept it)"
                    )
                    + f"; or {by_hand}",
                )
            os.replace(part, final)
            fresh = True
            if want is None:
                _record_sum(out, src.filename, got)
        if src.extract:
            targets = [out / m for m in src.extract]
            if fresh or not all(t.exists() for t in targets):
                _extract(final, list(src.extract), out)
            results.extend(targets)
        else:
            results.append(final)
    return results
