"""``torchfpi data list|fetch|check`` and the data-set registry.

The network tests serve a tiny mirror from a local HTTP server on 127.0.0.1 (a thread, stopped
at the end of each test and by a timer in any case) with a test manifest and registry patched in:
download, skip when present, checksum mismatch, interrupted download, corrupt archive, offline,
unknown name, ``check``'s exit codes. The ``data``-marked tests at the end use the real data sets
(skipped with the fetch command when they are not under the data root).
"""

from __future__ import annotations

import gc
import hashlib
import io
import shutil
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict

import pytest

from torchfpi.cli import main
from torchfpi.data import _fetch, _registry
from torchfpi.data._registry import Archive, DatasetInfo
from torchfpi.errors import DataError, UsageError

SERVER_LIFETIME_S = 60.0  # the server stops itself after this, whatever the test does

A, B = b"alpha file\n" * 50, b"beta file, a little longer\n" * 80
FRAME, FLOW = b"frame bytes " * 40, b"flow bytes " * 30


class _Mirror:
    """A bounded HTTP server on 127.0.0.1 serving ``files`` (URL path -> bytes).

    ``truncate`` holds paths whose body is cut in the middle (the connection closes before the
    end of the file); ``hits`` counts the requests per path.
    """

    def __init__(self) -> None:
        self.files: Dict[str, bytes] = {}
        self.truncate: set = set()
        self.hits: Dict[str, int] = {}
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                mirror.hits[self.path] = mirror.hits.get(self.path, 0) + 1
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in mirror.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.timer = threading.Timer(SERVER_LIFETIME_S, self.server.shutdown)
        self.timer.daemon = True

    def start(self) -> _Mirror:
        self.thread.start()
        self.timer.start()
        return self

    def stop(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _zip(members: Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def mirror(monkeypatch, tmp_path):
    """A local server, a two-set registry pointing at it and the matching manifest."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv(_registry.MIRROR_ENV, raising=False)
    server = _Mirror().start()
    server.files.update({
        "/up/tiny/a.txt": A,
        "/up/tiny/b.txt": B,
        "/up/zips/pairs.zip": _zip({"pairs/S1/frame10.png": FRAME, "pairs/S1/extra.txt": b"not listed"}),
        "/up/zips/truth.zip": _zip({"truth/truth/S1/flow10.flo": FLOW}),  # one wrapping folder
    })
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(
        "# test manifest\n"
        f"sets/tiny/a.txt\t{len(A)}\t{_sha(A)}\n"
        f"sets/tiny/b.txt\t{len(B)}\t{_sha(B)}\n"
        f"flowish/pairs/S1/frame10.png\t{len(FRAME)}\t{_sha(FRAME)}\n"
        f"flowish/truth/S1/flow10.flo\t{len(FLOW)}\t{_sha(FLOW)}\n"
    )
    datasets = {
        "tiny": DatasetInfo("tiny", "Tiny", "two text files", "public domain", "nobody, 2026",
                            f"{server.url}/home", ("sets/tiny",), file_url=f"{server.url}/up/tiny",
                            fallback_file_urls=(f"{server.url}/alt/tiny",)),
        "zipped": DatasetInfo("zipped", "Zipped", "two archives", "public domain", "nobody, 2026",
                              f"{server.url}/home", ("flowish/pairs", "flowish/truth"),
                              archives=(Archive(f"{server.url}/up/zips/pairs.zip", "flowish/pairs", "flowish"),
                                        Archive(f"{server.url}/up/zips/truth.zip", "flowish/truth", "flowish"))),
    }
    monkeypatch.setattr(_registry, "MANIFEST_FILE", manifest)
    monkeypatch.setattr(_registry, "DATASETS", datasets)
    try:
        yield server
    finally:
        server.stop()
        gc.collect()  # a connection left open by a download warns here, in the test that made it


def _fetch_cli(*argv: str) -> int:
    return main(["data", "fetch", *argv, "--quiet"])


def _no_partial(root: Path) -> bool:
    return not (root / _fetch.PARTIAL_DIR).exists()


def test_fetch_downloads_verifies_and_lays_out(mirror, tmp_path, capsys):
    root = tmp_path / "root"
    result = _fetch.fetch_dataset("tiny", root, progress=False)
    assert result.installed == 2 and result.downloaded == len(A) + len(B)
    assert (root / "sets/tiny/a.txt").read_bytes() == A and (root / "sets/tiny/b.txt").read_bytes() == B
    assert _no_partial(root)
    assert main(["data", "check", "tiny", "--root", str(root)]) == 0
    assert "tiny  present (2 files verified)" in capsys.readouterr().out


def test_fetch_skips_what_is_present(mirror, tmp_path, capsys):
    root = tmp_path / "root"
    assert _fetch_cli("tiny", "--root", str(root)) == 0
    hits = dict(mirror.hits)
    assert main(["data", "fetch", "tiny", "--root", str(root)]) == 0
    assert mirror.hits == hits  # nothing requested again
    assert "already present" in capsys.readouterr().out
    # a damaged file is found by check and is the only one fetched again
    (root / "sets/tiny/b.txt").write_bytes(b"damaged")
    assert main(["data", "check", "tiny", "--root", str(root)]) == 1
    assert "corrupt: 1 of 2 files differ from the manifest (first: sets/tiny/b.txt)" in capsys.readouterr().out
    assert _fetch_cli("tiny", "--root", str(root)) == 0
    assert mirror.hits["/up/tiny/a.txt"] == 1 and mirror.hits["/up/tiny/b.txt"] == 2
    assert (root / "sets/tiny/b.txt").read_bytes() == B


def test_checksum_mismatch_installs_nothing(mirror, tmp_path, capsys):
    root = tmp_path / "root"
    mirror.files["/up/tiny/b.txt"] = B[:-1] + b"!"
    assert _fetch_cli("tiny", "--root", str(root)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checksum mismatch" in err and "nothing was installed" in err
    assert not (root / "sets").exists()  # no half data set in the layout
    mirror.files["/up/tiny/b.txt"] = B  # the source is mended: a rerun completes
    assert _fetch_cli("tiny", "--root", str(root)) == 0
    assert mirror.hits["/up/tiny/a.txt"] == 1  # a.txt was kept from the first run
    assert (root / "sets/tiny/b.txt").read_bytes() == B and _no_partial(root)


def test_interrupted_download_leaves_no_half_data_set(mirror, tmp_path, capsys):
    root = tmp_path / "root"
    mirror.truncate.add("/up/tiny/b.txt")
    assert _fetch_cli("tiny", "--root", str(root)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the connection closed before the end of the file" in err and "run the command again" in err
    assert not (root / "sets").exists()
    leftovers = [p for p in (root / _fetch.PARTIAL_DIR).rglob("*") if p.is_file()]
    assert [p.name for p in leftovers] == ["a.txt"]  # only the complete file waits; no temporary
    assert main(["data", "check", "tiny", "--root", str(root)]) == 1
    assert "an interrupted download waits in" in capsys.readouterr().out
    mirror.truncate.clear()
    assert _fetch_cli("tiny", "--root", str(root)) == 0
    assert mirror.hits["/up/tiny/a.txt"] == 1 and mirror.hits["/up/tiny/b.txt"] == 2
    assert main(["data", "check", "tiny", "--root", str(root)]) == 0 and _no_partial(root)


def test_fallback_source_when_the_primary_fails(mirror, tmp_path, capsys):
    root = tmp_path / "root"
    del mirror.files["/up/tiny/b.txt"]  # the pinned URL is gone (HTTP 404) ...
    assert _fetch_cli("tiny", "--root", str(root)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchfpi: error: tiny: cannot download b.txt: http://") and len(err.splitlines()) == 1
    assert "/up/tiny/b.txt: HTTP 404 Not Found; http://" in err and "/alt/tiny/b.txt: HTTP 404 Not Found" in err
    mirror.files["/alt/tiny/b.txt"] = B  # ... and the fallback serves the same bytes
    assert _fetch_cli("tiny", "--root", str(root)) == 0
    assert (root / "sets/tiny/b.txt").read_bytes() == B and "/alt/tiny/a.txt" not in mirror.hits
    mirror.files["/alt/tiny/b.txt"] = b"something else"  # a fallback is verified like the rest
    (root / "sets/tiny/b.txt").unlink()
    assert _fetch_cli("tiny", "--root", str(root)) == 1
    assert "checksum mismatch" in capsys.readouterr().err and not (root / "sets/tiny/b.txt").exists()


def test_archives_are_extracted_by_layout_path(mirror, tmp_path, capsys):
    root = tmp_path / "root"
    result = _fetch.fetch_dataset("zipped", root, progress=True)  # progress bar on: must not break
    assert result.installed == 2
    assert (root / "flowish/pairs/S1/frame10.png").read_bytes() == FRAME
    assert (root / "flowish/truth/S1/flow10.flo").read_bytes() == FLOW
    assert not (root / "flowish/pairs/S1/extra.txt").exists()  # only the manifest's files
    assert _no_partial(root)


def test_corrupt_archive_is_deleted_and_refetched(mirror, tmp_path, capsys):
    root = tmp_path / "root"
    good = mirror.files["/up/zips/pairs.zip"]
    mirror.files["/up/zips/pairs.zip"] = b"PK this is no zip"
    assert _fetch_cli("zipped", "--root", str(root)) == 1
    err = capsys.readouterr().err
    assert "is not a readable zip archive" in err and not (root / "flowish").exists()
    # a well-formed archive whose member differs from the manifest
    mirror.files["/up/zips/pairs.zip"] = _zip({"pairs/S1/frame10.png": FRAME[:-1] + b"?"})
    assert _fetch_cli("zipped", "--root", str(root)) == 1
    assert "checksum mismatch for 'flowish/pairs/S1/frame10.png'" in capsys.readouterr().err
    assert not (root / "flowish").exists()
    # an archive without a file of the manifest
    mirror.files["/up/zips/pairs.zip"] = _zip({"pairs/S2/frame10.png": FRAME})
    assert _fetch_cli("zipped", "--root", str(root)) == 1
    assert "'flowish/pairs/S1/frame10.png' is not in the archive from http://" in capsys.readouterr().err
    assert not (root / "flowish").exists()
    mirror.files["/up/zips/pairs.zip"] = good
    assert _fetch_cli("zipped", "--root", str(root)) == 0
    assert mirror.hits["/up/zips/pairs.zip"] == 4 and mirror.hits["/up/zips/truth.zip"] == 1
    assert main(["data", "check", "--root", str(root)]) == 1  # tiny is still missing
    assert main(["data", "check", "zipped", "--root", str(root)]) == 0


def test_mirror_replaces_every_base_url(mirror, tmp_path, monkeypatch):
    for name, data in (("a.txt", A), ("b.txt", B)):
        mirror.files[f"/m/tiny/{name}"] = data
    mirror.files["/m/zipped/pairs.zip"] = mirror.files["/up/zips/pairs.zip"]
    mirror.files["/m/zipped/truth.zip"] = mirror.files["/up/zips/truth.zip"]
    root = tmp_path / "root"
    assert _fetch_cli("all", "--root", str(root), "--mirror", f"{mirror.url}/m/") == 0
    assert not any(path.startswith("/up/") for path in mirror.hits)
    # the environment variable does the same; a local folder works as a mirror too
    folder = tmp_path / "folder-mirror"
    for path, data in mirror.files.items():
        if path.startswith("/m/"):
            (folder / path[3:]).parent.mkdir(parents=True, exist_ok=True)
            (folder / path[3:]).write_bytes(data)
    monkeypatch.setenv(_registry.MIRROR_ENV, str(folder))
    hits = dict(mirror.hits)
    assert _fetch_cli("all", "--root", str(tmp_path / "root2")) == 0
    assert mirror.hits == hits
    assert main(["data", "check", "--root", str(tmp_path / "root2")]) == 0


def test_unknown_name_is_a_usage_error(mirror, tmp_path, capsys):
    assert _fetch_cli("tiny", "nope", "--root", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err == "torchfpi: error: unknown data set 'nope': expected one of tiny, zipped (or 'all')"
    assert main(["data", "check", "nope"]) == 2
    assert not (tmp_path / "sets").exists()
    with pytest.raises(UsageError, match="unknown data set"):
        _fetch.fetch_dataset("nope", tmp_path)


def test_offline_is_one_line_and_exit_1(mirror, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _fetch_cli("tiny", "--root", str(tmp_path / "r"), "--mirror", f"http://127.0.0.1:{port}") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "connection refused" in err and "--mirror" in err
    assert not (tmp_path / "r" / "sets").exists() and _no_partial(tmp_path / "r")  # nothing to resume
    assert _fetch_cli("tiny", "--root", str(tmp_path / "r"), "--mirror", f"{mirror.url}/missing") == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_check_exit_codes(mirror, tmp_path, capsys):
    root = tmp_path / "root"
    assert main(["data", "check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "tiny    missing; fetch it with `torchfpi data fetch tiny` (see docs/data.md)" in out
    _fetch.fetch_dataset("tiny", root, progress=False)
    (root / "sets/tiny/a.txt").unlink()
    assert main(["data", "check", "tiny", "--root", str(root)]) == 1
    assert "missing: 1 of 2 files missing (first: sets/tiny/a.txt)" in capsys.readouterr().out
    _fetch.fetch_dataset("tiny", root, progress=False)
    _fetch.fetch_dataset("zipped", root, progress=False)
    assert main(["data", "check", "--root", str(root)]) == 0


# -- the real registry and manifest (no network) -------------------------------------------------


def test_registry_covers_the_manifest():
    names = _registry.dataset_names()
    assert names == ["bibtex", "delicious", "train400", "bsd68", "middlebury"]
    counts = {n: len(_registry.DATASETS[n].files) for n in names}
    assert counts == {"bibtex": 3, "delicious": 3, "train400": 400, "bsd68": 68, "middlebury": 32}
    assert sum(counts.values()) == len(_registry.manifest())  # every manifest line has one owner
    for name in names:
        info = _registry.DATASETS[name]
        urls = _fetch.source_urls(name)
        assert all(u.startswith("https://") for u in urls.values())
        candidates = _fetch.candidate_urls(name)
        assert all(len(c) == 2 and c[0] == urls[k] for k, c in candidates.items())  # one fallback each
        if info.file_url is not None:
            assert set(urls) == {e.path for e in info.files}
        else:
            assert {a.provides for a in info.archives} == set(info.folders)
        mirrored = _fetch.source_urls(name, mirror="http://example.org/m")
        assert all(u.startswith(f"http://example.org/m/{name}/") for u in mirrored.values())


def test_list_describes_every_data_set(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in _registry.dataset_names():
        assert f"\n{name}: " in "\n" + out
    for word in ("licence:", "cite:", "source:", "size:", "vision.middlebury.edu", "tsoumakas/mulan",
                 "cszn/DnCNN", "docs/data.md"):
        assert word in out


def test_not_found_messages_name_the_fetch_command(tmp_path):
    from torchfpi.data import load_multilabel
    from torchfpi.data.images import list_images
    from torchfpi.io import data_root

    with pytest.raises(DataError, match=r"multilabel/delicious/delicious-train\.arff' does not exist; "
                       r"fetch it with `torchfpi data fetch delicious` \(see docs/data\.md\)"):
        load_multilabel("delicious", "train", root=tmp_path)
    with pytest.raises(DataError, match=r"Train400' does not exist; fetch it with `torchfpi data fetch train400`"):
        list_images(tmp_path / "denoise" / "Train400")
    (tmp_path / "denoise" / "BSD68").mkdir(parents=True)
    with pytest.raises(DataError, match=r"holds no \.png file; fetch it with `torchfpi data fetch bsd68`"):
        list_images(tmp_path / "denoise" / "BSD68")
    with pytest.raises(DataError, match=r"does not exist$"):  # not a data set's folder: no hint
        list_images(tmp_path / "my-images")
    with pytest.raises(DataError, match=r"torchfpi data fetch NAME --root .*docs/data\.md"):
        data_root(tmp_path / "nowhere")
    pytest.importorskip("cv2")
    from torchfpi.apps.flow import load_middlebury

    with pytest.raises(DataError, match=r"fetch it with `torchfpi data fetch middlebury`"):
        load_middlebury(tmp_path, "Venus")


def test_product_does_not_name_the_workshop():
    # The development machine keeps its data in a folder beside the checkout; the package must
    # neither look there nor name it (spelled in pieces so that this test does not name it either).
    beside = ("../" + "shared", "/work/" + "shared")
    package = Path(__file__).resolve().parents[1] / "torchfpi"
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not any(b in text for b in beside), path


# -- the real data sets (skipped with the fetch command when absent) ---------------------------


@pytest.mark.data("bibtex", "delicious", "train400", "bsd68", "middlebury")
def test_data_check_passes_on_the_data_root(data_root, capsys):
    assert main(["data", "check", "--root", str(data_root)]) == 0
    assert capsys.readouterr().out.count("present") == 5


@pytest.mark.data("delicious")
def test_delicious_loads_from_the_layout(data_root):
    from torchfpi.data import load_multilabel

    train, test = load_multilabel("delicious", "train", root=data_root), load_multilabel("delicious", "test", root=data_root)
    assert train.features.shape == (12920, 500) and test.labels.shape == (3185, 983)


@pytest.mark.data("train400", "bsd68")
def test_denoise_folders_read(data_root):
    from torchfpi.data.images import list_images, read_grey_png

    assert len(list_images(data_root / "denoise" / "Train400")) == 400
    bsd = list_images(data_root / "denoise" / "BSD68")
    assert len(bsd) == 68 and read_grey_png(bsd[0]).shape in ((321, 481), (481, 321))


@pytest.mark.data("middlebury")
def test_middlebury_loads(data_root):
    pytest.importorskip("cv2")
    from torchfpi.apps.flow import MIDDLEBURY_GT_SEQUENCES, load_middlebury

    for seq in MIDDLEBURY_GT_SEQUENCES:
        f1, f2, gt = load_middlebury(data_root, seq)
        assert f1.shape[:2] == f2.shape[:2] == gt.shape[:2] and gt.shape[2] == 2


@pytest.mark.data("bibtex", "delicious", "train400", "bsd68", "middlebury")
def test_fetch_all_from_a_mirror_of_the_real_data(data_root, tmp_path, monkeypatch):
    """The real manifest and layout end to end: a local mirror built from the data root, with the
    Middlebury archives zipped the way the publisher's are (other-data/..., other-gt-flow/...)."""
    monkeypatch.delenv(_registry.MIRROR_ENV, raising=False)
    mirror = tmp_path / "mirror"
    for name in ("bibtex", "delicious", "train400", "bsd68"):
        (mirror / name).mkdir(parents=True)
        for entry in _registry.DATASETS[name].files:
            shutil.copyfile(data_root / entry.path, mirror / name / Path(entry.path).name)
    (mirror / "middlebury").mkdir()
    for archive in _registry.DATASETS["middlebury"].archives:
        with zipfile.ZipFile(mirror / "middlebury" / Path(archive.url).name, "w") as zf:
            for entry in _registry.DATASETS["middlebury"].files:
                if entry.path.startswith(archive.provides + "/"):
                    zf.write(data_root / entry.path, entry.path[len(archive.base) + 1:])
    root = tmp_path / "fresh"
    assert _fetch_cli("all", "--root", str(root), "--mirror", str(mirror)) == 0
    assert main(["data", "check", "--root", str(root)]) == 0
    assert _no_partial(root)
