"""`cifar_binary.download` against a real HTTP server on 127.0.0.1 serving small synthetic
archives in the official layouts of CIFAR-10 and CIFAR-100 (full-size data files of low-entropy
bytes)."""
import dataclasses
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
import time

import numpy as np
import pytest

import cifar_binary
import run
from cifar_binary import ARCHIVE_DIR, CIFAR100, DataError, download, load_split
from test_run import TINY

pytestmark = pytest.mark.slow  # a download server

ARCHIVE = "cifar-10-binary.tar.gz"
BATCHES = cifar_binary.SPLIT_FILES["train"] + cifar_binary.SPLIT_FILES["test"]
ARCHIVE100 = "cifar-100-binary.tar.gz"
DIR100 = CIFAR100.archive_dir  # cifar-100-binary
FILES100 = ["train.bin", "test.bin", "coarse_label_names.txt", "fine_label_names.txt"]


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

    def serve(self, data, name=ARCHIVE):
        with open(os.path.join(self.folder, name), "wb") as f:
            f.write(data)
        return md5(data)

    def url_of(self, name):
        return self.url.replace(ARCHIVE, name)

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
    assert bool((load_split(root, "test")[0] == 6).all())
    assert not glob.glob(os.path.join(os.path.dirname(root), ".cifar-extract-*"))
    # the verified archive is kept next to the data folder and reused without a request
    with open(os.path.join(os.path.dirname(root), ARCHIVE), "rb") as f:
        assert md5(f.read()) == checksum
    shutil.rmtree(root)
    server.requests.clear()
    download(root, url=server.url, md5=checksum)
    assert server.requests == []
    assert bool((load_split(root, "test")[0] == 6).all())


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


def unreachable_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/{ARCHIVE}"


@pytest.mark.parametrize("parent", ["absent", "with a file of the user's"])
def test_a_failed_download_leaves_nothing_of_ours_behind(tmp_path, root, parent):
    if parent != "absent":
        os.makedirs(os.path.dirname(root))
        (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="download failed"):
        download(root, url=unreachable_url(), md5="0" * 32)  # offline
    if parent == "absent":  # neither the lock file nor the folders made for it
        assert os.listdir(tmp_path) == []
    else:
        assert os.listdir(tmp_path / "data") == ["notes.txt"]


def test_downloads_that_waited_on_a_failed_one_still_take_turns(tmp_path, root, monkeypatch):
    """The failed download removes its lock file while a second waits on it and a third comes
    after: the second must not hold the removed file's lock while the third holds the new
    file's."""
    first_inside, first_may_fail, lock = threading.Event(), threading.Event(), threading.Lock()
    inside, overlaps, errors = [], [], []

    def download_and_extract(root, url, md5, ds):
        with lock:
            overlaps.extend(inside)
            inside.append(url)
        try:
            if url == "first":
                first_inside.set()
                first_may_fail.wait(10)
                raise DataError("first: download failed (offline)")
            time.sleep(0.5)  # long enough for the third to come in
            os.makedirs(root, exist_ok=True)
            for name in BATCHES:  # sparse files of the official size: the data is there
                with open(os.path.join(root, name), "wb") as f:
                    f.truncate(cifar_binary.RECORDS_PER_FILE * cifar_binary.RECORD_BYTES)
        finally:
            with lock:
                inside.remove(url)

    monkeypatch.setattr(cifar_binary, "_download_and_extract", download_and_extract)

    def fetch(url):
        try:
            download(root, url=url, md5="0" * 32)
        except DataError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=fetch, args=(url,)) for url in ("first", "second", "third")]
    threads[0].start()
    assert first_inside.wait(10)
    threads[1].start()
    time.sleep(0.3)  # the second waits on the first's lock file
    first_may_fail.set()
    time.sleep(0.1)  # the first has failed and removed its lock file
    threads[2].start()
    for thread in threads:
        thread.join(20)
    assert errors == ["first: download failed (offline)"]
    assert overlaps == []
    assert sorted(os.listdir(root)) == sorted(BATCHES)


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
    assert bool((load_split(root, "test")[0] == 6).all())
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


# --- CIFAR-100: the same download path, its own archive and layout ----------------------------

def cifar100_bytes(index, records):
    """Coarse labels 0..19 and fine labels 0..99 repeating; every pixel equal to index + 1."""
    data = np.full((records, CIFAR100.record_bytes), index + 1, dtype=np.uint8)
    data[:, 0] = np.arange(records) % 20
    data[:, 1] = np.arange(records) % 100
    return data.tobytes()


def cifar100_members(full_size=True):
    """train.bin and test.bin (the official counts, or one record each) and the name lists."""
    members = {f"{DIR100}/{name}": cifar100_bytes(i, records if full_size else 1)
               for i, (name, records) in enumerate([("train.bin", 50_000), ("test.bin", 10_000)])}
    members[f"{DIR100}/coarse_label_names.txt"] = b"aquatic_mammals\nfish\n"
    members[f"{DIR100}/fine_label_names.txt"] = "\n".join(CIFAR100.classes).encode()
    return members


@pytest.fixture(scope="module")
def good_archive100():
    return make_archive(cifar100_members())


@pytest.fixture
def root100(tmp_path):
    return str(tmp_path / "data" / DIR100)


def test_cifar100_download_fetches_verifies_and_extracts_beside_cifar10(server, root100, tmp_path,
                                                                       good_archive100):
    cifar10_root = tmp_path / "data" / ARCHIVE_DIR  # a complete CIFAR-10 in the same data/
    os.makedirs(cifar10_root)
    for name in BATCHES:  # sparse files of the official size
        with open(cifar10_root / name, "wb") as f:
            f.truncate(cifar_binary.RECORDS_PER_FILE * cifar_binary.RECORD_BYTES)
    checksum = server.serve(good_archive100, ARCHIVE100)
    download(root100, "cifar100", url=server.url_of(ARCHIVE100), md5=checksum)
    assert server.requests
    assert sorted(os.listdir(root100)) == sorted(FILES100)
    images, labels = load_split(root100, "train", dataset="cifar100")
    assert images.shape == (50_000, 3, 32, 32) and bool((images == 1).all())
    assert labels[:3].tolist() == [0, 1, 2] and labels[99:102].tolist() == [99, 0, 1]  # fine
    assert bool((load_split(root100, "test", dataset="cifar100")[0] == 2).all())
    with open(os.path.join(root100, "fine_label_names.txt")) as f:
        assert f.read().split() == list(CIFAR100.classes)
    parent = os.path.dirname(root100)
    assert not glob.glob(os.path.join(parent, ".cifar-extract-*"))
    assert sorted(os.listdir(cifar10_root)) == sorted(BATCHES)  # CIFAR-10 left as it was
    # both are complete now: neither asks the server again
    server.requests.clear()
    download(root100, "cifar100", url=server.url_of(ARCHIVE100), md5=checksum)
    download(str(cifar10_root), url=server.url, md5="0" * 32)
    assert server.requests == []


def test_download_defaults_to_each_official_archive(monkeypatch, tmp_path):
    fetched = []
    def fetch(root, url, md5, ds):
        fetched.append((os.path.basename(root), url, md5))

    monkeypatch.setattr(cifar_binary, "_download_and_extract", fetch)
    download(str(tmp_path / "a" / "cifar-10-batches-bin"))
    download(str(tmp_path / "b" / "cifar-100-binary"), "cifar100")
    download(str(tmp_path / "c" / "mine"), dataset=CIFAR100, md5="1" * 32)
    assert fetched == [
        ("cifar-10-batches-bin", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
         "c32a1d4ab5d03f1284b67883e8d87530"),
        ("cifar-100-binary", "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
         "03b5dce01913d631647c71ecec9e9cb8"),
        ("mine", "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "1" * 32)]


def test_cifar100_wrong_md5_deletes_archive_and_creates_no_data_folder(server, root100):
    server.serve(make_archive(cifar100_members(full_size=False)), ARCHIVE100)
    with pytest.raises(DataError, match="md5") as e:
        download(root100, "cifar100", url=server.url_of(ARCHIVE100), md5="0" * 32)
    assert "\n" not in str(e.value) and server.requests
    assert_nothing_extracted(root100)
    assert not os.path.exists(os.path.join(os.path.dirname(root100), ARCHIVE100))


def test_cifar10_archive_is_not_taken_for_cifar100(server, root100):
    checksum = server.serve(make_archive(tiny_members()), ARCHIVE100)
    with pytest.raises(DataError) as e:
        download(root100, "cifar100", url=server.url_of(ARCHIVE100), md5=checksum)
    assert str(e.value).endswith(f"{ARCHIVE100}: missing {DIR100}/test.bin, {DIR100}/train.bin")
    assert_nothing_extracted(root100)


def test_cifar100_archive_with_short_files_is_rejected_before_it_becomes_visible(server, root100):
    checksum = server.serve(make_archive(cifar100_members(full_size=False)), ARCHIVE100)
    with pytest.raises(DataError, match="bad contents: .*train.bin: 1 records, expected 50,000"):
        download(root100, "cifar100", url=server.url_of(ARCHIVE100), md5=checksum)
    assert_nothing_extracted(root100)


def test_cifar100_data_dir_holding_other_files_is_refused_before_any_request(server, root100):
    checksum = server.serve(make_archive(cifar100_members(full_size=False)), ARCHIVE100)
    os.makedirs(root100)
    for name in ("notes.txt", "train.bin"):
        with open(os.path.join(root100, name), "w") as f:
            f.write("mine")
    with pytest.raises(DataError) as e:
        download(root100, "cifar100", url=server.url_of(ARCHIVE100), md5=checksum)
    assert str(e.value) == (f"{root100}: incomplete CIFAR-100 folder that also holds notes.txt; "
                            "--download replaces this folder, so point --data-dir at a "
                            "cifar-100-binary folder or a new one")
    assert server.requests == []
    assert sorted(os.listdir(root100)) == ["notes.txt", "train.bin"]


def test_incomplete_cifar100_folder_is_replaced_by_the_download(server, root100, good_archive100):
    os.makedirs(root100)
    with open(os.path.join(root100, "train.bin"), "w") as f:  # an interrupted copy
        f.write("old")
    checksum = server.serve(good_archive100, ARCHIVE100)
    download(root100, "cifar100", url=server.url_of(ARCHIVE100), md5=checksum)
    assert sorted(os.listdir(root100)) == sorted(FILES100)
    assert bool((load_split(root100, "train", dataset="cifar100")[0] == 1).all())


@pytest.fixture
def official_cifar100_at(monkeypatch):
    """CIFAR-100's official archive, as run.py knows it, moved to `url` with checksum `md5`."""
    def move(url, md5):
        moved = dataclasses.replace(CIFAR100, url=url, md5=md5)
        monkeypatch.setitem(cifar_binary.DATASETS, "cifar100", moved)
    return move


def test_run_py_download_fetches_the_data_set_it_trains_and_tests_on(server, root100, tmp_path,
                                                                     good_archive100,
                                                                     official_cifar100_at):
    official_cifar100_at(server.url_of(ARCHIVE100), server.serve(good_archive100, ARCHIVE100))
    args = ["1", "--dataset", "cifar100", "--download", "--data-dir", root100,
            "--logdir", str(tmp_path / "logs")]
    assert run.main([*args[:1], "train", *args[1:], *TINY, "--eval-every", "1000"]) == 0
    assert server.requests and all(ARCHIVE100 in path for path in server.requests)
    assert sorted(os.listdir(root100)) == sorted(FILES100)
    server.requests.clear()
    assert run.main([*args[:1], "test", *args[1:]]) == 0
    assert server.requests == []  # complete: not fetched again
