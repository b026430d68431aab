"""``launch.py data``: the plan on an exact table; downloads from a local
HTTP server the test starts (good, resumed, truncated, wrong checksum, 404,
stalled, a server that ignores Range), checked against SHA-256 computed
here with hashlib; the CIFAR-10 archive's members taken out safely and read
back by the reader; the command's lines and exit codes, called in-process."""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from commands import data as command
from pipeline.data import download
from pipeline.data.download import Local, Step, plan
from pipeline.data.files import CIFAR_FILES, CIFAR_RECORD, CIFAR_SUBDIR, MNIST_FILES, load_cifar10
from pipeline.data.sources import DATASETS, Dataset, Remote
from pipeline.run.subcommands import DataArgs, parse_data

pytestmark = pytest.mark.timeout(30)

STALL_S = 0.3   # the client's --timeout against a server that stalls


# --- the server ----------------------------------------------------------------------------

class Site:
    """What the test server serves: bodies by path, and how to misbehave
    (``drop``: close after N bytes, once; ``stall``: headers, N bytes, then
    nothing until the test ends; ``no-range``: answer a Range with the whole
    file). Records each request's path and Range header."""

    def __init__(self):
        self.bodies: dict[str, bytes] = {}
        self.faults: dict[str, tuple[str, int]] = {}
        self.seen: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        self.url = ""


def _handler(site: Site):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # the test reads ``site.seen`` instead
            pass

        def do_GET(self):
            path = self.path.lstrip("/")
            ask = self.headers.get("Range")
            site.seen.append((path, ask))
            if path not in site.bodies:
                self.send_error(404, "Not Found")
                return
            body = site.bodies[path]
            kind, n = site.faults.get(path, ("", 0))
            m = re.fullmatch(r"bytes=(\d+)-", ask or "")
            start = int(m.group(1)) if m and kind != "no-range" else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if kind == "drop":
                del site.faults[path]
                self.wfile.write(body[start:start + n])
                return  # HTTP/1.0: the connection closes with the bytes short
            if kind == "stall":
                self.wfile.write(body[start:start + n])
                self.wfile.flush()
                site.release.wait(10)  # until the test ends: a server gone quiet
                return
            self.wfile.write(body[start:])
    return Handler


@pytest.fixture
def site():
    s = Site()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    httpd.daemon_threads = True
    s.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield s
    s.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


# --- generated datasets ----------------------------------------------------------------------

def remote(name: str, body: bytes) -> Remote:
    return Remote(name, len(body), hashlib.sha256(body).hexdigest())


def mnist_like(site: Site, sizes=(300_000, 5_000), prefix="") -> Dataset:
    """Two files of random bytes on the site (several chunks and one), with
    their checksums as the table publishes them."""
    rng = np.random.default_rng(len(site.bodies))
    files = []
    for i, size in enumerate(sizes):
        body = rng.integers(0, 256, size, np.uint8).tobytes()
        name = f"file{i}.gz"
        site.bodies[prefix + name] = body
        files.append(remote(name, body))
    return Dataset("toy", (site.url + prefix,), tuple(files), dataset_option="--dataset mnist")


def run(dataset: Dataset, directory: Path, mirror: str | None = None, keep: bool = False,
        timeout: float = 5.0) -> tuple[int, str, str]:
    """The command in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    args = DataArgs(dataset.name, str(directory), mirror, timeout, keep)
    code = command.main(args, out, err, {dataset.name: dataset})
    return code, out.getvalue(), err.getvalue()


def error_of(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("data: error:")]
    assert len(lines) == 1, err
    return lines[0]


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# --- the plan ----------------------------------------------------------------------------------

A, B = Remote("a.gz", 100, "aa" * 32), Remote("b.gz", 50, "bb" * 32)
TWO = Dataset("two", ("http://x/",), (A, B))
ARCHIVE = Dataset("arc", ("http://x/",), (A,), members=(("d/m1", 30), ("d/m2", 20)))


@pytest.mark.parametrize("dataset, local, in_place, steps, extract, need", [
    (TWO, {}, False, [("a.gz", "fetch", 0), ("b.gz", "fetch", 0)], False, 150),
    (TWO, {"a.gz": Local(A.sha256)}, False, [("a.gz", "verified", 0), ("b.gz", "fetch", 0)],
     False, 50),
    (TWO, {"a.gz": Local("0" * 64, part=40)}, False,
     [("a.gz", "replace", 40), ("b.gz", "fetch", 0)], False, 110),
    (TWO, {"b.gz": Local(part=20)}, False, [("a.gz", "fetch", 0), ("b.gz", "resume", 20)],
     False, 130),
    (TWO, {"b.gz": Local(part=51)}, False, [("a.gz", "fetch", 0), ("b.gz", "fetch", 0)],
     False, 150),   # a part longer than the file is not its prefix
    (TWO, {"b.gz": Local(part=50)}, False, [("a.gz", "fetch", 0), ("b.gz", "resume", 50)],
     False, 100),   # whole: only its checksum to check
    (ARCHIVE, {}, False, [("a.gz", "fetch", 0)], True, 150),
    (ARCHIVE, {"a.gz": Local(A.sha256)}, False, [("a.gz", "verified", 0)], True, 50),
    (ARCHIVE, {}, True, [], False, 0),
])
def test_the_plan_on_an_exact_table(dataset, local, in_place, steps, extract, need):
    p = plan(dataset, local, in_place)
    assert [(s.remote.name, s.action, s.have) for s in p.steps] == steps
    assert (p.extract, p.need_bytes) == (extract, need)


def test_the_published_table():
    """Names the readers look for, sizes as published, digests that are SHA-256."""
    mnist_names = sorted(f"{n}.gz" for pair in MNIST_FILES.values() for n in pair)
    for name in ("mnist", "fashion-mnist"):
        assert sorted(r.name for r in DATASETS[name].files) == mnist_names
    cifar = DATASETS["cifar10"]
    assert [r.name for r in cifar.files] == ["cifar-10-binary.tar.gz"]
    assert cifar.members == tuple((f"{CIFAR_SUBDIR}/{n}", 10_000 * CIFAR_RECORD)
                                  for names in CIFAR_FILES.values() for n in names)
    for d in DATASETS.values():
        assert all(m.startswith(("https://", "http://")) and m.endswith("/") for m in d.mirrors)
        assert all(re.fullmatch(r"[0-9a-f]{64}", r.sha256) and r.size > 0 for r in d.files)


# --- downloads --------------------------------------------------------------------------------

def test_a_good_download_is_verified_and_in_place(site, tmp_path):
    toy = mnist_like(site)
    code, out, err = run(toy, tmp_path / "new" / "dir")
    assert code == 0, err
    d = tmp_path / "new" / "dir"
    assert listing(d) == ["file0.gz", "file1.gz"]  # no part file left
    for r in toy.files:
        assert hashlib.sha256((d / r.name).read_bytes()).hexdigest() == r.sha256
        assert (d / r.name).stat().st_mode & 0o777 == 0o600
    assert out == f"toy: 2 files in {d}, each SHA-256 verified; train with: python launch.py " \
                  f"--dataset mnist --data-dir {d}\n"
    assert "file0.gz: SHA-256 verified" in err and "100 %" in err
    assert [r for _, r in site.seen] == [None, None]


def test_files_already_in_place_are_not_fetched_again(site, tmp_path):
    toy = mnist_like(site)
    assert run(toy, tmp_path)[0] == 0
    site.seen.clear()
    code, _, err = run(toy, tmp_path)
    assert code == 0 and site.seen == []
    assert "file0.gz: already here, SHA-256 verified" in err


def test_a_file_in_place_with_another_checksum_is_replaced(site, tmp_path):
    toy = mnist_like(site)
    (tmp_path / "file1.gz").write_bytes(b"not the published bytes")
    code, _, err = run(toy, tmp_path)
    assert code == 0, err
    assert "file1.gz: here, but its SHA-256 is not the published one" in err
    assert (tmp_path / "file1.gz").read_bytes() == site.bodies["file1.gz"]


def test_a_broken_transfer_is_resumed_with_a_range_request(site, tmp_path):
    toy = mnist_like(site)
    site.faults["file0.gz"] = ("drop", 100_000)
    code, _, err = run(toy, tmp_path)
    part = tmp_path / ".file0.gz.part"
    assert code == 1
    assert error_of(err) == (
        f"data: error: file0.gz: {site.url}file0.gz: the connection closed after 100,000 of "
        f"300,000 bytes (100,000 bytes kept in {part}: the same command resumes from there)")
    assert listing(tmp_path) == [".file0.gz.part"]
    assert part.read_bytes() == site.bodies["file0.gz"][:100_000]
    site.seen.clear()
    code, _, err = run(toy, tmp_path)
    assert code == 0, err
    assert "file0.gz: resuming at byte 100,000 of 300,000" in err
    assert site.seen[0] == ("file0.gz", "bytes=100000-")
    assert (tmp_path / "file0.gz").read_bytes() == site.bodies["file0.gz"]
    assert listing(tmp_path) == ["file0.gz", "file1.gz"]


def test_a_server_that_ignores_the_range_starts_the_file_over(site, tmp_path):
    toy = mnist_like(site)
    body = site.bodies["file0.gz"]
    (tmp_path / ".file0.gz.part").write_bytes(b"x" * 1000)  # not even a prefix of it
    site.faults["file0.gz"] = ("no-range", 0)
    code, _, err = run(toy, tmp_path)
    assert code == 0, err
    assert site.seen[0] == ("file0.gz", "bytes=1000-")
    assert (tmp_path / "file0.gz").read_bytes() == body


def test_a_file_of_another_size_is_refused_before_a_byte_is_written(site, tmp_path):
    toy = mnist_like(site)
    site.bodies["file1.gz"] = site.bodies["file1.gz"][:-7]  # truncated on the mirror itself
    code, _, err = run(toy, tmp_path / "d")
    assert code == 1
    assert error_of(err) == (f"data: error: file1.gz: {site.url}file1.gz: the file there is "
                             "4,993 bytes, the published one 5,000")
    assert listing(tmp_path / "d") == ["file0.gz"]  # what was verified before stays


def test_a_wrong_checksum_leaves_nothing(site, tmp_path):
    toy = mnist_like(site)
    body = site.bodies["file0.gz"]
    site.bodies["file0.gz"] = bytes([body[0] ^ 1]) + body[1:]  # same size, one bit off
    code, _, err = run(toy, tmp_path / "d")
    assert code == 1
    line = error_of(err)
    assert line.startswith(f"data: error: file0.gz: {site.url}file0.gz: SHA-256 ")
    assert line.endswith(f"is not the published {toy.files[0].sha256[:16]}... (deleted)")
    assert not (tmp_path / "d").exists()  # the directory it made, gone with it


def test_a_missing_file_is_one_line(site, tmp_path):
    toy = mnist_like(site)
    del site.bodies["file1.gz"]
    (tmp_path / "mine.txt").write_text("the user's")
    code, _, err = run(toy, tmp_path)
    assert code == 1
    assert error_of(err) == f"data: error: file1.gz: {site.url}file1.gz: HTTP 404 Not Found"
    assert listing(tmp_path) == ["file0.gz", "mine.txt"]


def test_the_next_mirror_is_tried_and_the_part_carried_over(site, tmp_path):
    toy = mnist_like(site, prefix="b/")
    site.faults["b/file0.gz"] = ("drop", 50_000)
    assert run(toy, tmp_path)[0] == 1
    both = Dataset("toy", (site.url + "a/", site.url + "b/"), toy.files, dataset_option="x")
    site.seen.clear()
    code, _, err = run(both, tmp_path)
    assert code == 0, err
    assert f"{site.url}a/file0.gz: HTTP 404 Not Found; trying the next mirror" in err
    assert site.seen[:2] == [("a/file0.gz", "bytes=50000-"), ("b/file0.gz", "bytes=50000-")]
    assert (tmp_path / "file0.gz").read_bytes() == site.bodies["b/file0.gz"]


@pytest.mark.parametrize("sent", [0, 70_000])
def test_a_stalled_server_times_out_in_one_line(site, tmp_path, sent):
    toy = mnist_like(site)
    site.faults["file0.gz"] = ("stall", sent)
    code, _, err = run(toy, tmp_path / "d", timeout=STALL_S)
    assert code == 1
    head = f"data: error: file0.gz: {site.url}file0.gz: no answer for {STALL_S:g} s (--timeout)"
    if sent:
        part = tmp_path / "d" / ".file0.gz.part"
        assert error_of(err) == (f"{head} after 70,000 of 300,000 bytes (70,000 bytes kept in "
                                 f"{part}: the same command resumes from there)")
        assert listing(tmp_path / "d") == [".file0.gz.part"]
    else:
        assert error_of(err) == f"{head} after 0 of 300,000 bytes"
        assert not (tmp_path / "d").exists()


def test_a_local_directory_or_file_url_as_the_mirror(site, tmp_path):
    toy = mnist_like(site)
    local = tmp_path / "copy"
    local.mkdir()
    for name, body in site.bodies.items():
        (local / name).write_bytes(body)
    (tmp_path / "d1").mkdir()
    (tmp_path / "d1" / ".file0.gz.part").write_bytes(site.bodies["file0.gz"][:1234])
    for mirror, d in ((str(local), "d1"), (local.as_uri() + "/", "d2")):
        code, _, err = run(toy, tmp_path / d, mirror=mirror)
        assert code == 0, err
        assert (tmp_path / d / "file0.gz").read_bytes() == site.bodies["file0.gz"]
    assert site.seen == []


def test_too_little_disk_space_is_said_before_any_request(site, tmp_path, monkeypatch):
    toy = mnist_like(site)
    monkeypatch.setattr(command.files, "free_bytes", lambda path: 1000)
    code, _, err = run(toy, tmp_path)
    assert code == 1 and site.seen == []
    assert error_of(err) == f"data: error: {tmp_path}: 305.0 kB needed, 1.0 kB free"


# --- the archive ---------------------------------------------------------------------------------

def cifar_archive(records: int, extra: list[tarfile.TarInfo | tuple[str, bytes]]):
    """A .tar.gz laid out as cifar-10-binary.tar.gz is, with ``records``
    records a batch file, and the batches' bytes by name."""
    rng = np.random.default_rng(0)
    batches, buf = {}, io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for names in CIFAR_FILES.values():
            for n in names:
                rec = rng.integers(0, 256, (records, CIFAR_RECORD), np.uint8)
                rec[:, 0] %= 10
                batches[n] = rec.tobytes()
                info = tarfile.TarInfo(f"{CIFAR_SUBDIR}/{n}")
                info.size = len(batches[n])
                tar.addfile(info, io.BytesIO(batches[n]))
        for item in extra:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
            else:
                info = tarfile.TarInfo(item[0])
                info.size = len(item[1])
                tar.addfile(info, io.BytesIO(item[1]))
    return buf.getvalue(), batches


def cifar_like(site: Site, body: bytes, records: int) -> Dataset:
    real = DATASETS["cifar10"]
    site.bodies[real.files[0].name] = body
    return Dataset("cifar10", (site.url,), (remote(real.files[0].name, body),),
                   members=tuple((name, records * CIFAR_RECORD) for name, _ in real.members),
                   dataset_option=real.dataset_option)


def hostile_members(outside: Path) -> list:
    """Members an unchecked extraction would write out of DIR, or follow."""
    link = tarfile.TarInfo(f"{CIFAR_SUBDIR}/batches.link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return [("../escaped.bin", b"out of DIR"), (str(outside / "absolute.bin"), b"absolute"),
            (f"{CIFAR_SUBDIR}/../../up.bin", b"up"), (f"{CIFAR_SUBDIR}/readme.html", b"<p>"),
            link]


def test_the_cifar_archive_gives_its_six_files_and_nothing_else(site, tmp_path):
    body, batches = cifar_archive(3, hostile_members(tmp_path / "outside"))
    cifar = cifar_like(site, body, 3)
    d = tmp_path / "in" / "data"
    code, out, err = run(cifar, d)
    assert code == 0, err
    assert listing(tmp_path / "in") == ["data", f"data/{CIFAR_SUBDIR}"] + sorted(
        f"data/{CIFAR_SUBDIR}/{n}" for n in batches)  # the archive removed, nothing escaped
    assert not (tmp_path / "outside").exists() and not (tmp_path / "escaped.bin").exists()
    for n, b in batches.items():
        assert (d / CIFAR_SUBDIR / n).read_bytes() == b
    loaded = load_cifar10(d)  # the reader finds them where they went
    assert loaded["train"].x.shape == (15, 3072) and loaded["test"].x.shape == (3, 3072)
    assert "cifar-10-binary.tar.gz: removed (--keep-archive keeps it)" in err
    assert out.startswith(f"cifar10: 6 files in {d / CIFAR_SUBDIR} (taken out of the verified")
    site.seen.clear()
    code, out, _ = run(cifar, d)  # all six in place: no request at all
    assert code == 0 and site.seen == [] and "(already there)" in out


def test_keep_archive_keeps_it_and_a_rerun_uses_it(site, tmp_path):
    body, batches = cifar_archive(2, [])
    cifar = cifar_like(site, body, 2)
    assert run(cifar, tmp_path, keep=True)[0] == 0
    assert (tmp_path / "cifar-10-binary.tar.gz").read_bytes() == body
    (tmp_path / CIFAR_SUBDIR / "test_batch.bin").unlink()
    site.seen.clear()
    code, _, err = run(cifar, tmp_path, keep=True)
    assert code == 0 and site.seen == [], err
    assert (tmp_path / CIFAR_SUBDIR / "test_batch.bin").read_bytes() == batches["test_batch.bin"]


@pytest.mark.parametrize("damage, why", [
    ("link", "member cifar-10-batches-bin/test_batch.bin is not a regular file"),
    ("short", "member cifar-10-batches-bin/test_batch.bin is 3,073 bytes, expected 6,146"),
    ("missing", "holds no cifar-10-batches-bin/test_batch.bin"),
])
def test_a_wrong_member_takes_nothing_out(site, tmp_path, damage, why):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n in [n for names in CIFAR_FILES.values() for n in names][:-1]:
            info = tarfile.TarInfo(f"{CIFAR_SUBDIR}/{n}")
            info.size = 2 * CIFAR_RECORD
            tar.addfile(info, io.BytesIO(rng.integers(0, 10, info.size, np.uint8).tobytes()))
        last = tarfile.TarInfo(f"{CIFAR_SUBDIR}/test_batch.bin")
        if damage == "link":
            last.type, last.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(last)
        elif damage == "short":
            last.size = CIFAR_RECORD
            tar.addfile(last, io.BytesIO(bytes(CIFAR_RECORD)))
    cifar = cifar_like(site, buf.getvalue(), 2)
    code, _, err = run(cifar, tmp_path)
    assert code == 1
    assert error_of(err) == f"data: error: {tmp_path / 'cifar-10-binary.tar.gz'}: {why}"
    # the verified archive stays for the next try; no member, no temporary
    assert listing(tmp_path) == [CIFAR_SUBDIR, "cifar-10-binary.tar.gz"]


# --- the command line and its progress ---------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["imagenet", "d"], "argument DATASET: invalid choice: 'imagenet'"),
    (["mnist"], "the following arguments are required: DIR"),
    (["mnist", "d", "--timeout", "0"], "argument --timeout: must be in (0, 86400] seconds, got 0"),
    (["mnist", "d", "--timeout", "nan"], "argument --timeout: must be in (0, 86400]"),
    (["mnist", "d", "--mirror", "ftp://x/"], "argument --mirror: not an http(s):// or file://"),
    (["mnist", "x" * 300], "argument DIR: a name of 300 bytes in the path"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        parse_data(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("launch.py data: error: ") and message in err, err


def test_the_arguments_parse():
    assert parse_data(["cifar10", "d", "--mirror", "https://m/", "--timeout", "5",
                       "--keep-archive"]) == DataArgs("cifar10", "d", "https://m/", 5.0, True)
    assert parse_data(["fashion-mnist", "d"]) == DataArgs("fashion-mnist", "d", None, 30.0, False)


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_piped_is_a_line_a_tenth_and_on_a_terminal_one_line_redrawn():
    now = [0.0]
    piped = command.Meter("f.gz", Stream(False), clock=lambda: now[0])
    for done in range(0, 2_000_001, 100_000):
        now[0] = done / 1e6
        piped(done, 2_000_000)
    lines = piped.err.getvalue().splitlines()
    shown = ["200.0 kB", "400.0 kB", "600.0 kB", "800.0 kB", "1.0 MB", "1.2 MB", "1.4 MB",
             "1.6 MB", "1.8 MB", "2.0 MB"]
    assert lines == [f"f.gz  {s} of 2.0 MB  {10 * k} %  1.0 MB/s" for k, s in enumerate(shown, 1)]
    now[0] = 0.0
    tty = command.Meter("f.gz", Stream(True), clock=lambda: now[0])
    tty(500_000, 1_000_000)  # a resume: the rate counts this process's bytes
    for done, t in ((600_000, 0.05), (700_000, 0.2), (1_000_000, 0.25)):
        now[0] = t
        tty(done, 1_000_000)
    tty.end()
    assert tty.err.getvalue() == ("\rf.gz  500.0 kB of 1.0 MB  50 %\x1b[K"
                                  "\rf.gz  700.0 kB of 1.0 MB  70 %  1.0 MB/s\x1b[K"
                                  "\rf.gz  1.0 MB of 1.0 MB  100 %  2.0 MB/s\x1b[K\n")


def test_a_directory_that_is_a_file_is_refused(site, tmp_path):
    toy = mnist_like(site)
    (tmp_path / "f").write_text("")
    code, _, err = run(toy, tmp_path / "f")
    assert code == 1 and error_of(err) == f"data: error: {tmp_path / 'f'}: not a directory"
    assert site.seen == []


def test_an_interrupt_keeps_the_part_and_says_so(site, tmp_path, monkeypatch):
    toy = mnist_like(site)
    real = download.transfer

    def interrupted(url, part, size, timeout, progress):
        def stop(done, total):
            progress(done, total)
            if done >= 131_072:
                raise KeyboardInterrupt
        real(url, part, size, timeout, stop)
    monkeypatch.setattr(download, "transfer", interrupted)
    err = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        command.main(DataArgs("toy", str(tmp_path), None, 5.0, False), io.StringIO(), err,
                     {"toy": toy})
    assert err.getvalue().splitlines()[-1] == (f"data: interrupted; .file0.gz.part kept in "
                                               f"{tmp_path}: the same command resumes from there")
    kept = (tmp_path / ".file0.gz.part").read_bytes()
    assert len(kept) >= 131_072 and kept == site.bodies["file0.gz"][:len(kept)]
    monkeypatch.undo()
    assert run(toy, tmp_path)[0] == 0
    assert site.seen[-2][1] == f"bytes={len(kept)}-"


@pytest.mark.slow
def test_launch_py_runs_the_command(tmp_path):
    """Through ``launch.py``: a bad argument exits 2, a failed fetch 1, each
    with one line; a local mirror's wrong file leaves nothing."""
    from tests.conftest import error_line, run_launch
    assert "invalid choice: 'svhn'" in error_line(run_launch("data", "svhn", str(tmp_path)))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "train-images-idx3-ubyte.gz").write_bytes(b"not MNIST")
    proc = run_launch("data", "mnist", str(tmp_path / "d"), "--mirror", str(mirror))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"data: error: train-images-idx3-ubyte.gz: {mirror}/train-images-idx3-ubyte.gz: the "
        "file there is 9 bytes, the published one 9,912,422")
    assert proc.stdout == "" and not (tmp_path / "d").exists()
