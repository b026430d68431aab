"""Fetching a dataset's published files: what is already in place and what
to fetch (a pure plan), one file's transfer from its mirrors, resumed with
an HTTP Range request into DIR/.NAME.part and moved into place only once its
SHA-256 is the published one, and an archive's expected members taken out.

A transfer that breaks (the connection closed, no data for ``timeout``
seconds, interrupted) keeps the bytes it received in the part file, which
the next fetch resumes from; a file whose checksum is wrong is deleted.
Nothing else is ever left: a failed fetch leaves only a part file, named as
such, and a file in place is replaced only by a verified one."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, url2pathname, urlopen

from pipeline import files
from pipeline.data.sources import Dataset, Remote

CHUNK = 1 << 16
USER_AGENT = "dni-pipeline-data/1"
Progress = Callable[[int, int], None]   # (bytes so far, bytes in all)


class DownloadError(Exception):
    """A fetch that failed, in one line (what, from where, why)."""


def part_path(directory: Path, name: str) -> Path:
    """Where the bytes of ``name`` gather until they are verified."""
    return directory / f".{name}.part"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the plan: pure ----------------------------------------------------------------------

@dataclass(frozen=True)
class Local:
    """What DIR holds of one file."""
    digest: str | None = None   # SHA-256 of DIR/NAME, None if absent
    part: int = 0               # bytes in DIR/.NAME.part


@dataclass(frozen=True)
class Step:
    remote: Remote
    action: str   # "verified" (in place, nothing to do), "fetch", "resume", "replace"
    have: int     # bytes a resume starts from


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    extract: bool       # take the archive's members out afterwards
    need_bytes: int     # disk space the fetches and the extraction take


def plan(dataset: Dataset, local: Mapping[str, Local], members_in_place: bool) -> Plan:
    """What to do about each file of ``dataset``, given what DIR holds. An
    archive whose members are all in place is not needed at all."""
    if dataset.members and members_in_place:
        return Plan((), False, 0)
    steps, need = [], 0
    for r in dataset.files:
        have = local.get(r.name, Local())
        part = have.part if have.part <= r.size else 0  # longer than the file: not its prefix
        if have.digest == r.sha256:
            steps.append(Step(r, "verified", 0))
            continue
        action = "replace" if have.digest is not None else "resume" if part else "fetch"
        steps.append(Step(r, action, part))
        need += r.size - part
    members = sum(size for _, size in dataset.members)
    return Plan(tuple(steps), bool(dataset.members), need + members)


def look(directory: Path, dataset: Dataset) -> tuple[dict[str, Local], bool]:
    """What DIR holds of each file (hashing those in place), and whether
    every member of the archive is in place at its size."""
    local = {}
    for r in dataset.files:
        path, part = directory / r.name, part_path(directory, r.name)
        local[r.name] = Local(sha256_of(path) if path.is_file() else None,
                              part.stat().st_size if part.is_file() else 0)
    in_place = bool(dataset.members) and all(
        (directory / name).is_file() and (directory / name).stat().st_size == size
        for name, size in dataset.members)
    return local, in_place


# --- one file from its mirrors --------------------------------------------------------------

def url_of(base: str, name: str) -> str:
    """The file ``name`` under a mirror: a base URL or a local directory."""
    return base + name if base.endswith("/") else f"{base}/{name}"


def _why(exc: BaseException, timeout: float) -> str:
    """A network failure in a few words."""
    reason = getattr(exc, "reason", exc)
    if isinstance(exc, HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, TimeoutError) or isinstance(reason, TimeoutError):
        return f"no answer for {timeout:g} s (--timeout)"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(exc).__name__


def _open(url: str, start: int, timeout: float):
    """(body, the offset its first byte is at, its length if known) of ``url``
    from byte ``start``: an HTTP(S) URL with a Range request (a server that
    ignores it answers from byte 0), or a file:// URL or local path."""
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={start}-"} if start else {})}
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
        offset = 0
        if resp.status == 206:
            unit, _, span = (resp.headers.get("Content-Range") or "").partition(" ")
            first = span.partition("-")[0]
            if unit != "bytes" or not first.isdigit() or int(first) != start:
                resp.close()
                raise DownloadError(f"asked from byte {start}, the server answered "
                                    f"Content-Range {resp.headers.get('Content-Range')!r}")
            offset = start
        length = resp.headers.get("Content-Length") or ""
        return resp, offset, int(length) if length.isdigit() else None
    path = url2pathname(urlsplit(url).path) if scheme == "file" else url
    f = open(path, "rb")
    size = os.fstat(f.fileno()).st_size
    start = min(start, size)
    f.seek(start)
    return f, start, size - start


def transfer(url: str, part: Path, size: int, timeout: float, progress: Progress) -> None:
    """The part file completed to ``size`` bytes from ``url``, resuming from
    what it holds; DownloadError, the part file kept, when the transfer
    breaks. A write to the disk that fails raises OSError."""
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    try:
        body, offset, length = _open(url, have, timeout)
    except DownloadError:
        raise
    except (OSError, ValueError) as exc:  # URLError, HTTPError, http.client's errors
        if isinstance(exc, HTTPError):
            exc.close()
        raise DownloadError(_why(exc, timeout)) from None
    with contextlib.closing(body):
        if length is not None and offset + length != size:
            raise DownloadError(f"the file there is {offset + length:,} bytes, the published "
                                f"one {size:,}")
        with open(files.open_private(part, os.O_APPEND if offset else os.O_TRUNC), "ab") as out:
            done = offset
            progress(done, size)
            while done < size:
                try:  # read1: what has arrived, not a wait for a full chunk
                    chunk = body.read1(min(CHUNK, size - done))
                except (OSError, ValueError) as exc:  # a timeout, a reset, http.client's
                    raise DownloadError(f"{_why(exc, timeout)} after {done:,} of {size:,} "
                                        "bytes") from None
                if not chunk:
                    raise DownloadError(f"the connection closed after {done:,} of {size:,} bytes")
                out.write(chunk)
                out.flush()  # what is in the part file is a prefix of the file, always
                done += len(chunk)
                progress(done, size)
            os.fsync(out.fileno())


def fetch(remote: Remote, directory: Path, mirrors: tuple[str, ...], timeout: float,
          progress: Progress, note: Callable[[str], None] = lambda text: None) -> Path:
    """DIR/NAME, verified: from each mirror in turn until one gives the
    published bytes. DownloadError in one line naming every mirror's failure
    and the part file kept, if any."""
    final, part = directory / remote.name, part_path(directory, remote.name)
    failures = []
    for base in mirrors:
        url = url_of(base, remote.name)
        try:
            transfer(url, part, remote.size, timeout, progress)
        except KeyboardInterrupt:
            _drop_if_empty(part)
            raise
        except DownloadError as exc:
            failures.append(f"{url}: {exc}")
            if len(failures) < len(mirrors):
                note(f"{url}: {exc}; trying the next mirror")
            continue
        digest = sha256_of(part)
        if digest != remote.sha256:
            part.unlink()
            failures.append(f"{url}: SHA-256 {digest[:16]}... is not the published "
                            f"{remote.sha256[:16]}... (deleted)")
            continue
        os.replace(part, final)
        return final
    kept = _drop_if_empty(part)
    tail = (f" ({kept:,} bytes kept in {part}: the same command resumes from there)"
            if kept else "")
    raise DownloadError(f"{remote.name}: " + "; ".join(failures) + tail)


def _drop_if_empty(part: Path) -> int:
    """The bytes a part file keeps for a resume; an empty one is removed."""
    kept = part.stat().st_size if part.is_file() else 0
    if part.is_file() and not kept:
        part.unlink()
    return kept


# --- an archive's members -----------------------------------------------------------------

def extract(archive: Path, directory: Path, members: tuple[tuple[str, int], ...]) -> list[Path]:
    """Each expected member of a .tar.gz written to DIR/<its path>, whole or
    not at all. Only regular files of exactly the expected names and sizes
    are read; every other member (a link, a path out of DIR) is never
    written. DownloadError in one line if one is missing or wrong."""
    want = dict(members)
    taken: dict[str, Path] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                if name not in want:
                    continue
                if name in taken or not info.isreg() or info.size != want[name]:
                    why = ("twice" if name in taken else "not a regular file" if not info.isreg()
                           else f"{info.size:,} bytes, expected {want[name]:,}")
                    raise DownloadError(f"{archive}: member {name} is {why}")
                target = directory / name
                files.make_private_dirs(target.parent)
                tmp = target.with_name(files.temporary(target.name))
                taken[name] = tmp
                with tar.extractfile(info) as src, \
                        open(files.open_private(tmp, os.O_TRUNC), "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
        missing = [n for n in want if n not in taken]
        if missing:
            raise DownloadError(f"{archive}: holds no {missing[0]}")
        for name, tmp in taken.items():
            os.replace(tmp, directory / name)
        return [directory / name for name in want]
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DownloadError(f"{archive}: not a readable .tar.gz ({exc})") from None
    finally:
        for tmp in taken.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
