"""The CIFAR-10 and CIFAR-100 binary readers against hostile input: random bytes, damaged files,
odd paths, and paths that are not regular files (FIFOs, devices, folders).

Every outcome is either correctly decoded data or a one-line `DataError` naming the file;
never another exception, never a silently short data set."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cifar_binary
from cifar_binary import CIFAR10, CIFAR100, RECORD_BYTES, DataError, load_split, read_records
from conftest import no_hang
from synthetic import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = cifar_binary.SPLIT_FILES["train"] + cifar_binary.SPLIT_FILES["test"]
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def path():
    """One file path, rewritten by every example; an awkward folder name on purpose."""
    folder = tempfile.mkdtemp(prefix="hostile dir é ")
    yield os.path.join(folder, "data batch.bin")
    shutil.rmtree(folder)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def valid(data, expected_records, ds=CIFAR10):
    """What the reader must accept: whole records, the expected count, every label byte in
    range (CIFAR-10: 0-9; CIFAR-100: coarse 0-19 and fine 0-99)."""
    if len(data) % ds.record_bytes:
        return False
    raw = np.frombuffer(data, np.uint8).reshape(-1, ds.record_bytes)
    if expected_records is not None and len(raw) != expected_records:
        return False
    return bool((raw[:, :len(ds.label_counts)] < np.array(ds.label_counts)).all())


def read_and_check(path, data, expected_records, ds=CIFAR10):
    """Read `data` from `path`; assert the outcome is right; return the DataError or None."""
    write(path, data)
    try:
        images, labels = read_records(path, expected_records=expected_records, dataset=ds)
    except DataError as e:
        message = str(e)
        assert "\n" not in message and path in message
        assert not valid(data, expected_records, ds), f"rejected a valid file: {message}"
        return e
    assert valid(data, expected_records, ds)
    raw = np.frombuffer(data, np.uint8).reshape(-1, ds.record_bytes)
    assert images.dtype == np.uint8 and images.shape == (len(raw), 3, 32, 32)
    assert labels.dtype == np.int64 and labels.shape == (len(raw),)
    np.testing.assert_array_equal(images.reshape(len(raw), cifar_binary.PIXEL_BYTES),
                                  raw[:, len(ds.label_counts):])
    np.testing.assert_array_equal(labels, raw[:, ds.target])
    return None


def record_bytes(label_strategy):
    pixels = st.binary(min_size=RECORD_BYTES - 1, max_size=RECORD_BYTES - 1)
    return st.builds(lambda label, image: bytes([label]) + image, label_strategy, pixels)


well_formed = st.lists(record_bytes(st.integers(0, 9)), min_size=1, max_size=3).map(b"".join)
mostly_plausible = st.one_of(
    st.binary(max_size=2 * RECORD_BYTES + 10),  # almost never whole records
    st.lists(record_bytes(st.integers(0, 9) | st.integers(0, 255)), max_size=3).map(b"".join),
)


@SETTINGS
@given(data=mostly_plausible, expected=st.sampled_from([None, 0, 1, 2, 3]))
def test_any_bytes_load_correctly_or_raise_data_error(path, data, expected):
    read_and_check(path, data, expected)


@SETTINGS
@given(data=well_formed, cut_fraction=st.floats(0, 1, exclude_max=True))
def test_truncation_at_any_byte_is_caught(path, data, cut_fraction):
    cut = int(len(data) * cut_fraction)
    assert read_and_check(path, data[:cut], len(data) // RECORD_BYTES) is not None
    read_and_check(path, data[:cut], None)  # a whole-record prefix may load, as itself


@SETTINGS
@given(data=well_formed, garbage=st.binary(min_size=1, max_size=RECORD_BYTES + 5))
def test_appended_garbage_is_caught(path, data, garbage):
    assert read_and_check(path, data + garbage, len(data) // RECORD_BYTES) is not None
    read_and_check(path, data + garbage, None)


@SETTINGS
@given(data=well_formed, st_data=st.data())
def test_bad_label_bytes_are_caught_at_the_first_bad_record(path, data, st_data):
    count = len(data) // RECORD_BYTES
    bad = st_data.draw(st.sets(st.integers(0, count - 1), min_size=1))
    corrupted = bytearray(data)
    for index in bad:
        corrupted[index * RECORD_BYTES] = st_data.draw(st.integers(10, 255))
    first = min(bad)
    for expected in (count, None):
        error = read_and_check(path, bytes(corrupted), expected)
        assert error is not None
        assert f"record {first} has label byte {corrupted[first * RECORD_BYTES]}," in str(error)


def record100_bytes(coarse_strategy, fine_strategy):
    pixels = st.binary(min_size=cifar_binary.PIXEL_BYTES, max_size=cifar_binary.PIXEL_BYTES)
    return st.builds(lambda coarse, fine, image: bytes([coarse, fine]) + image,
                     coarse_strategy, fine_strategy, pixels)


RECORD100_BYTES = CIFAR100.record_bytes
well_formed100 = st.lists(record100_bytes(st.integers(0, 19), st.integers(0, 99)),
                          min_size=1, max_size=3).map(b"".join)
mostly_plausible100 = st.one_of(
    st.binary(max_size=2 * RECORD100_BYTES + 10),
    st.lists(record100_bytes(st.integers(0, 19) | st.integers(0, 255),
                             st.integers(0, 99) | st.integers(0, 255)), max_size=3).map(b"".join),
)


@SETTINGS
@given(data=mostly_plausible100, expected=st.sampled_from([None, 0, 1, 2, 3]))
def test_cifar100_any_bytes_load_correctly_or_raise_data_error(path, data, expected):
    read_and_check(path, data, expected, CIFAR100)


@SETTINGS
@given(data=well_formed100, cut_fraction=st.floats(0, 1, exclude_max=True))
def test_cifar100_truncation_at_any_byte_is_caught(path, data, cut_fraction):
    cut = int(len(data) * cut_fraction)
    assert read_and_check(path, data[:cut], len(data) // RECORD100_BYTES, CIFAR100) is not None


@SETTINGS
@given(data=well_formed100, st_data=st.data())
def test_cifar100_bad_coarse_or_fine_label_is_caught_at_the_first_bad_record(path, data, st_data):
    count = len(data) // RECORD100_BYTES
    bad = st_data.draw(st.dictionaries(st.integers(0, count - 1), st.sampled_from([0, 1]),
                                       min_size=1))  # record -> its bad label byte
    corrupted = bytearray(data)
    for index, byte in bad.items():
        limit = CIFAR100.label_counts[byte]  # 20 coarse labels, 100 fine labels
        corrupted[index * RECORD100_BYTES + byte] = st_data.draw(st.integers(limit, 255))
    first = min(bad)
    byte = bad[first]
    value = corrupted[first * RECORD100_BYTES + byte]
    name, highest = [("coarse label", 19), ("fine label", 99)][byte]
    for expected in (count, None):
        error = read_and_check(path, bytes(corrupted), expected, CIFAR100)
        assert error is not None
        assert f"record {first} has {name} byte {value}, expected 0-{highest} " in str(error)


def test_zero_length_file(tmp_path):
    path = str(tmp_path / "empty.bin")
    write(path, b"")
    with pytest.raises(DataError, match="0 records, expected 10,000"):
        read_records(path)
    images, labels = read_records(path, expected_records=None)  # nothing to complain about
    assert images.shape == (0, 3, 32, 32) and labels.shape == (0,)


def test_directory_in_place_of_the_file(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.mkdir()
    with pytest.raises(DataError, match="is a directory") as e:
        read_records(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.bin")
    with pytest.raises(DataError, match="file not found") as e:
        read_records(path)
    assert path in str(e.value) and "\n" not in str(e.value)


READ_AS_NOBODY = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import cifar_binary  # first: nobody cannot read root's interpreter files
os.setgid(65534)
os.setuid(65534)
out = {}
for path in sys.argv[2:]:
    try:
        images, _ = cifar_binary.read_records(path, expected_records=None)
        out[path] = ["ok", len(images)]
    except Exception as e:
        out[path] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


def test_unreadable_file_raises_data_error():
    folder = tempfile.mkdtemp(prefix="hostile-perm-")  # not under pytest's 0700 tmp folders
    try:
        os.chmod(folder, 0o755)
        readable, unreadable = os.path.join(folder, "ok.bin"), os.path.join(folder, "locked.bin")
        for p in (readable, unreadable):
            write(p, records(2))
        os.chmod(readable, 0o644)
        os.chmod(unreadable, 0o000)
        if os.geteuid() != 0:
            with pytest.raises(DataError, match="cannot read") as e:
                read_records(unreadable, expected_records=None)
            assert unreadable in str(e.value)
            return
        # root reads anything: drop to nobody in a child process
        result = subprocess.run([sys.executable, "-c", READ_AS_NOBODY, ROOT, readable, unreadable],
                                capture_output=True, text=True, timeout=120, cwd="/")
        if result.returncode != 0:
            pytest.skip(f"cannot run as uid 65534 here: {result.stderr.strip().splitlines()[-1:]}")
        out = json.loads(result.stdout)
        assert out[readable] == ["ok", 2]  # the child really reads files it may read
        kind, message = out[unreadable]
        assert kind == "DataError"
        assert unreadable in message and "cannot read" in message and "\n" not in message
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("name", FILES)
def test_load_split_rejects_a_batch_truncated_by_one_byte(synthetic_cifar, tmp_path, name):
    root = tmp_path / "cifar"
    root.mkdir()
    for other in FILES:
        if other != name:
            os.symlink(os.path.join(synthetic_cifar, other), root / other)
    with open(os.path.join(synthetic_cifar, name), "rb") as f:
        write(str(root / name), f.read()[:-1])
    split = "test" if name == "test_batch.bin" else "train"
    with pytest.raises(DataError, match="30,729,999 bytes") as e:
        load_split(str(root), split)
    assert str(root / name) in str(e.value)
    other_split = "train" if split == "test" else "test"
    assert len(load_split(str(root), other_split)[0]) == (50_000 if split == "test" else 10_000)


# --- paths that are not regular files of the expected size: refused before a byte is read ----

def test_fifo_in_place_of_a_batch_file_is_refused_without_hanging(tmp_path):
    fifo = str(tmp_path / "data_batch_1.bin")
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would block for ever
    with no_hang(), pytest.raises(DataError, match="is a FIFO") as e:
        read_records(fifo)
    assert str(e.value).startswith(f"{fifo}: ") and "\n" not in str(e.value)


def test_load_split_names_the_fifo_among_the_batches(synthetic_cifar, tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    for name in FILES:
        if name != "data_batch_3.bin":
            os.symlink(os.path.join(synthetic_cifar, name), root / name)
    os.mkfifo(root / "data_batch_3.bin")
    with no_hang(), pytest.raises(DataError, match="is a FIFO") as e:
        load_split(str(root), "train")
    assert str(e.value).startswith(f"{root / 'data_batch_3.bin'}: ")
    assert len(load_split(str(root), "test")[0]) == 10_000  # symlinks to regular files are fine


def test_cifar100_fifo_in_place_of_train_bin_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "train.bin")
    with no_hang(), pytest.raises(DataError) as e:
        load_split(str(tmp_path), "train", dataset="cifar100")
    assert str(e.value) == (f"{tmp_path / 'train.bin'}: is a FIFO, "
                            "expected a CIFAR-100 binary data file")


def test_symlink_to_a_regular_file_is_read(tmp_path):
    target = tmp_path / "elsewhere.bin"
    write(str(target), records(3))
    os.symlink(target, tmp_path / "data_batch_1.bin")
    images, labels = read_records(str(tmp_path / "data_batch_1.bin"), expected_records=3)
    assert images.shape == (3, 3, 32, 32) and labels.shape == (3,)


def test_symlink_to_a_folder_is_refused(tmp_path):
    os.symlink(tmp_path, tmp_path / "data_batch_1.bin")
    with pytest.raises(DataError, match="is a directory") as e:
        read_records(str(tmp_path / "data_batch_1.bin"))
    assert str(e.value).startswith(f"{tmp_path / 'data_batch_1.bin'}: ")


def test_file_that_changes_between_the_size_check_and_the_read_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "data_batch_1.bin")
    write(path, records(2))
    real_open = os.open

    def open_after_an_append(name, *args, **kwargs):  # another process writes in between
        with open(name, "ab") as f:
            f.write(records(1))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_an_append)
    with pytest.raises(DataError, match="changed while being read") as e:
        read_records(path, expected_records=2)
    assert str(e.value).startswith(f"{path}: ")


# Run in a child process whose address space is capped at 1 GiB more than it uses once
# imported, and with an alarm per file: a reader that reads before it checks then fails
# with MemoryError or RuntimeError there instead of filling this machine's memory.
READ_CAPPED = """
import json, resource, signal, sys
sys.path.insert(0, sys.argv[1])
import cifar_binary
with open("/proc/self/status") as f:
    used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.RLIM_INFINITY))

def hung(signum, frame):
    raise RuntimeError("still reading after 20 s")

signal.signal(signal.SIGALRM, hung)
out = {}
for path in sys.argv[2:]:
    signal.alarm(20)
    try:
        images, _ = cifar_binary.read_records(path)
        out[path] = ["ok", len(images)]
    except Exception as e:
        out[path] = [type(e).__name__, str(e)]
    finally:
        signal.alarm(0)
print(json.dumps(out))
"""


def test_devices_and_files_of_another_size_are_refused_before_a_byte_is_read(tmp_path):
    zero, null = str(tmp_path / "data_batch_1.bin"), str(tmp_path / "data_batch_2.bin")
    os.symlink("/dev/zero", zero)  # endless bytes
    os.symlink("/dev/null", null)
    huge = str(tmp_path / "data_batch_3.bin")  # 268,435,456 whole records, 825 GB, sparse
    with open(huge, "wb") as f:
        try:
            f.truncate(RECORD_BYTES * 2**28)
        except OSError as e:
            pytest.skip(f"no sparse file of 825 GB here: {e}")
    fifo = str(tmp_path / "data_batch_4.bin")
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-c", READ_CAPPED, ROOT, zero, null, huge, fifo],
                            capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    expected = "expected a CIFAR-10 binary data file"
    assert out[zero] == ["DataError", f"{zero}: is a character device (/dev/zero), {expected}"]
    assert out[null] == ["DataError", f"{null}: is a character device (/dev/null), {expected}"]
    assert out[huge] == ["DataError", f"{huge}: 268,435,456 records, expected 10,000"]
    assert out[fifo] == ["DataError", f"{fifo}: is a FIFO, {expected}"]
