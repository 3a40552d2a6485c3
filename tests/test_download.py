"""`cifar_binary.download` against a real HTTP server on 127.0.0.1 serving small synthetic
archives in the official layout (full-size batch files of low-entropy bytes)."""
import functools
import glob
import hashlib
import http.server
import io
import os
import shutil
import socket
import tarfile
import threading

import numpy as np
import pytest

import cifar_binary
from cifar_binary import ARCHIVE_DIR, DataError, download, load_split

ARCHIVE = "cifar-10-binary.tar.gz"
BATCHES = cifar_binary.SPLIT_FILES["train"] + cifar_binary.SPLIT_FILES["test"]


def batch_bytes(index, records=cifar_binary.RECORDS_PER_FILE):
    """Labels 0..9 repeating, every pixel of batch file `index` equal to index + 1."""
    data = np.full((records, cifar_binary.RECORD_BYTES), index + 1, dtype=np.uint8)
    data[:, 0] = np.arange(records) % 10
    return data.tobytes()


@functools.lru_cache(maxsize=None)
def good_members():
    members = {f"{ARCHIVE_DIR}/{name}": batch_bytes(i) for i, name in enumerate(BATCHES)}
    members[f"{ARCHIVE_DIR}/batches.meta.txt"] = "\n".join(cifar_binary.CLASSES).encode()
    return members


def tiny_members():
    """One record per batch: enough for archives that must fail before validation (cheap)."""
    members = {f"{ARCHIVE_DIR}/{name}": batch_bytes(i, records=1) for i, name in enumerate(BATCHES)}
    members[f"{ARCHIVE_DIR}/batches.meta.txt"] = b"airplane\n"
    return members


def make_archive(members, extra=()):
    """tar.gz bytes of `members` {name: bytes} followed by `extra` [(TarInfo, bytes or None)]."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=9) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_archive():
    return make_archive(good_members())


def md5(data):
    return hashlib.md5(data).hexdigest()


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving one folder; counts requests; can announce
    a Content-Length larger than what it sends (`truncate_to`), or send a cut chunked body."""

    def __init__(self, folder):
        self.folder, self.requests, self.truncate_to, self.chunked = folder, [], None, False
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=folder, **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                if server.truncate_to is None:
                    return super().do_GET()
                with open(os.path.join(folder, self.path.lstrip("/")), "rb") as f:
                    body = f.read()
                self.protocol_version = "HTTP/1.1"
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                if server.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                part = body[:server.truncate_to]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if server.chunked else part)
                self.close_connection = True

            def do_HEAD(self):
                server.requests.append(self.path)
                return super().do_HEAD()

        class Quiet(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients that hang up early (torchvision's redirect probe) are fine

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{ARCHIVE}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, data):
        with open(os.path.join(self.folder, ARCHIVE), "wb") as f:
            f.write(data)
        return md5(data)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "served"
    folder.mkdir()
    s = Server(str(folder))
    yield s
    s.close()


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "data" / ARCHIVE_DIR)


def assert_nothing_extracted(root):
    parent = os.path.dirname(root)
    assert not os.path.exists(root)
    assert not glob.glob(os.path.join(parent, ".cifar-extract-*"))  # no staging left behind


def test_download_fetches_verifies_and_extracts_the_batches(server, root, good_archive):
    checksum = server.serve(good_archive)
    download(root, url=server.url, md5=checksum)
    assert server.requests
    assert sorted(os.listdir(root)) == sorted(BATCHES + ["batches.meta.txt"])
    images, labels = load_split(root, "train")
    assert images.shape == (50_000, 3, 32, 32)
    assert images[10_000].unique().tolist() == [2]  # first image of data_batch_2
    assert labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert load_split(root, "test")[0].unique().tolist() == [6]
    assert not glob.glob(os.path.join(os.path.dirname(root), ".cifar-extract-*"))
    # the verified archive is kept next to the data folder and reused without a request
    with open(os.path.join(os.path.dirname(root), ARCHIVE), "rb") as f:
        assert md5(f.read()) == checksum
    shutil.rmtree(root)
    server.requests.clear()
    download(root, url=server.url, md5=checksum)
    assert server.requests == []
    assert load_split(root, "test")[0].unique().tolist() == [6]


def test_complete_data_folder_skips_the_download(tmp_path, root):
    os.makedirs(root)
    for name in BATCHES:  # sparse files of the official size
        with open(os.path.join(root, name), "wb") as f:
            f.truncate(cifar_binary.RECORDS_PER_FILE * cifar_binary.RECORD_BYTES)
    download(root, url="http://127.0.0.1:9/nothing-listens-here.tar.gz", md5="0" * 32)
    assert sorted(os.listdir(root)) == sorted(BATCHES)
    assert os.listdir(tmp_path / "data") == [ARCHIVE_DIR]  # no archive, no staging folder


def test_wrong_md5_deletes_archive_and_creates_no_data_folder(server, root, good_archive):
    server.serve(good_archive)
    with pytest.raises(DataError, match="md5") as e:
        download(root, url=server.url, md5="0" * 32)
    assert "\n" not in str(e.value)
    assert server.requests
    assert_nothing_extracted(root)
    assert not os.path.exists(os.path.join(os.path.dirname(root), ARCHIVE))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_truncated_download_is_rejected_and_deleted(server, root, good_archive, chunked):
    checksum = server.serve(good_archive)
    server.truncate_to, server.chunked = len(good_archive) // 2, chunked
    with pytest.raises(DataError):
        download(root, url=server.url, md5=checksum)
    assert server.requests
    assert_nothing_extracted(root)
    assert not os.path.exists(os.path.join(os.path.dirname(root), ARCHIVE))


def test_unreachable_server_raises_data_error(root):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="download failed"):
        download(root, url=f"http://127.0.0.1:{port}/{ARCHIVE}", md5="0" * 32)
    assert_nothing_extracted(root)


def hostile_members(tmp_path):
    def regular(name, data=b"pwned"):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        return info, data

    def link(name, target, kind):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        return info, None

    return [
        regular("../evil-up.txt"),
        regular(f"{ARCHIVE_DIR}/../../evil-up2.txt"),
        regular(f"{ARCHIVE_DIR}/../evil-sibling.txt"),
        regular(str(tmp_path / "evil-absolute.txt")),
        regular(f"{ARCHIVE_DIR}/evil-extra.txt"),
        regular(f"./{ARCHIVE_DIR}/evil-dot.txt"),
        link(f"{ARCHIVE_DIR}/evil-symlink", "/etc/passwd", tarfile.SYMTYPE),
        link(f"{ARCHIVE_DIR}/batches.meta.txt", "/etc/passwd", tarfile.SYMTYPE),
        link(f"{ARCHIVE_DIR}/evil-hardlink", "/etc/passwd", tarfile.LNKTYPE),
    ]


def test_hostile_members_are_not_extracted_anywhere(server, root, tmp_path):
    members = dict(good_members())
    del members[f"{ARCHIVE_DIR}/batches.meta.txt"]  # replaced by a symlink below
    checksum = server.serve(make_archive(members, hostile_members(tmp_path)))
    download(root, url=server.url, md5=checksum)
    assert sorted(os.listdir(root)) == sorted(BATCHES)  # only the regular batch files
    everything = [os.path.join(d, f) for d, dirs, files in os.walk(tmp_path) for f in dirs + files]
    assert not [p for p in everything if "evil" in os.path.basename(p)]
    assert not [p for p in everything if os.path.islink(p)]
    assert not os.path.exists(os.path.join(os.path.dirname(str(tmp_path)), "evil-up.txt"))
    assert load_split(root, "train")[0].shape == (50_000, 3, 32, 32)


def test_archive_missing_a_batch_is_rejected_without_data_folder(server, root):
    members = tiny_members()
    del members[f"{ARCHIVE_DIR}/test_batch.bin"]
    checksum = server.serve(make_archive(members))
    with pytest.raises(DataError, match="missing cifar-10-batches-bin/test_batch.bin"):
        download(root, url=server.url, md5=checksum)
    assert_nothing_extracted(root)


def test_archive_with_a_short_batch_is_rejected_before_it_becomes_visible(server, root):
    members = tiny_members()  # validation stops at the first bad file: data_batch_2
    members[f"{ARCHIVE_DIR}/data_batch_1.bin"] = batch_bytes(0)
    members[f"{ARCHIVE_DIR}/data_batch_2.bin"] = batch_bytes(1)[:-1]
    checksum = server.serve(make_archive(members))
    with pytest.raises(DataError, match="data_batch_2.bin: 30,729,999 bytes") as e:
        download(root, url=server.url, md5=checksum)
    assert "\n" not in str(e.value)
    assert_nothing_extracted(root)


def test_failed_download_keeps_an_existing_data_folder(server, root):
    os.makedirs(root)
    with open(os.path.join(root, "data_batch_1.bin"), "w") as f:  # an incomplete data set
        f.write("old")
    members = tiny_members()
    del members[f"{ARCHIVE_DIR}/data_batch_5.bin"]
    checksum = server.serve(make_archive(members))
    with pytest.raises(DataError, match="data_batch_5.bin"):
        download(root, url=server.url, md5=checksum)
    assert os.listdir(root) == ["data_batch_1.bin"]
    with open(os.path.join(root, "data_batch_1.bin")) as f:
        assert f.read() == "old"


def test_incomplete_data_folder_is_replaced_by_the_download(server, root, good_archive):
    os.makedirs(root)
    for name in ("data_batch_1.bin", "readme.html"):  # what an interrupted copy may leave
        with open(os.path.join(root, name), "w") as f:
            f.write("old")
    download(root, url=server.url, md5=server.serve(good_archive))
    assert sorted(os.listdir(root)) == sorted(BATCHES + ["batches.meta.txt"])
    assert load_split(root, "train")[0][0].unique().tolist() == [1]


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_data_dir_holding_other_files_is_refused_untouched_before_any_request(server, root,
                                                                              good_archive, kind):
    checksum = server.serve(good_archive)
    if kind == "folder":  # e.g. --data-dir . or --data-dir ~/datasets
        os.makedirs(root)
        for name in ("notes.txt", "data_batch_1.bin"):
            with open(os.path.join(root, name), "w") as f:
                f.write("mine")
        expected = "also holds notes.txt"
    else:
        os.makedirs(os.path.dirname(root))
        with open(root, "w") as f:
            f.write("mine")
        expected = "is a file"
    with pytest.raises(DataError, match=expected) as e:
        download(root, url=server.url, md5=checksum)
    assert "\n" not in str(e.value) and root in str(e.value)
    assert server.requests == []
    if kind == "folder":
        assert sorted(os.listdir(root)) == ["data_batch_1.bin", "notes.txt"]
    else:
        with open(root) as f:
            assert f.read() == "mine"


def test_concurrent_downloads_take_turns_and_fetch_once(server, root, good_archive, tmp_path):
    checksum = server.serve(good_archive)
    download(str(tmp_path / "alone" / ARCHIVE_DIR), url=server.url, md5=checksum)
    requests_of_one_download = len(server.requests)
    server.requests.clear()
    errors = []

    def fetch():
        try:
            download(root, url=server.url, md5=checksum)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]  # like torchrun's processes
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(server.requests) == requests_of_one_download
    assert load_split(root, "test")[0].unique().tolist() == [6]
    assert not glob.glob(os.path.join(os.path.dirname(root), ".cifar-extract-*"))


@pytest.mark.parametrize("damage", ["not-gzip", "cut-gzip", "corrupt-deflate"])
def test_damaged_archive_with_matching_md5_raises_data_error(server, root, good_archive, damage):
    if damage == "not-gzip":
        data = b"this is not a tar.gz file\n" * 100
    elif damage == "cut-gzip":
        data = good_archive[:len(good_archive) // 2]
    else:  # flip bytes inside the compressed stream, keeping the gzip header
        data = bytearray(good_archive)
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xA5 for b in data[middle:middle + 64])
        data = bytes(data)
    checksum = server.serve(data)
    with pytest.raises(DataError):
        download(root, url=server.url, md5=checksum)
    assert_nothing_extracted(root)
