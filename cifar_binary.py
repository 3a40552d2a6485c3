"""CIFAR-10 for Section 4.2 of He et al. 2015, read from the official binary records.

A record is 3073 bytes: the label (0-9), then the 1024 red, 1024 green and 1024 blue bytes of a
32x32 image, each plane row-major. `data_batch_1.bin` .. `data_batch_5.bin` hold the 50,000
training images, `test_batch.bin` the 10,000 test images, 10,000 records each.

Also here: the official archive's download, the per-pixel mean, and the paper's augmentation
("4 pixels are padded on each side, and a 32x32 crop is randomly sampled from the padded image
or its horizontal flip") as batched tensor code on any device.
"""
import fcntl
import http.client
import os
import shutil
import stat
import tarfile
import tempfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # of the official 170,052,171-byte archive
ARCHIVE_DIR = "cifar-10-batches-bin"  # the folder inside the archive
SPLIT_FILES = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["test_batch.bin"],
}
# What the official cifar-10-batches-bin folder holds.
OFFICIAL_FILES = {*SPLIT_FILES["train"], *SPLIT_FILES["test"], "batches.meta.txt", "readme.html"}
RECORD_BYTES = 1 + 3 * 32 * 32
RECORDS_PER_FILE = 10_000
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")


class DataError(Exception):
    """A data set problem the user can fix; the message is one line naming the file."""


def read_records(path, expected_records=RECORDS_PER_FILE):
    """One binary batch file -> (uint8 array (R, 3, 32, 32), int64 array (R,)), validated.

    The file must be a regular file (or a symlink to one) whose size is checked before a byte
    is read: a FIFO, a device or a folder is refused, never read, so none can hang the reader
    or fill the memory."""
    size = _regular_file_size(path)
    if size % RECORD_BYTES:
        raise DataError(f"{path}: {size:,} bytes is not a whole number of "
                        f"{RECORD_BYTES}-byte records (truncated or not a CIFAR-10 binary file)")
    count = size // RECORD_BYTES
    if expected_records is not None and count != expected_records:
        raise DataError(f"{path}: {count:,} records, expected {expected_records:,}")
    records = _read_exactly(path, size).reshape(count, RECORD_BYTES)
    labels = records[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DataError(f"{path}: record {bad[0]} has label byte {labels[bad[0]]}, expected 0-9 "
                        "(not a CIFAR-10 binary file?)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _regular_file_size(path):
    """The size of `path`, which must be a regular file; symlinks are followed, nothing opened."""
    try:
        mode_and_size = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; pass --download, or fetch {URL} "
                        "and extract it so that this file exists") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    mode = mode_and_size.st_mode
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        link = f" ({os.path.realpath(path)})" if os.path.islink(path) else ""
        raise DataError(f"{path}: is {kind}{link}, expected a CIFAR-10 binary data file")
    return mode_and_size.st_size


def _read_exactly(path, size):
    """The `size` bytes of the regular file `path` as a uint8 array; a file that is swapped or
    changes size meanwhile is refused (O_NONBLOCK: even a FIFO put there since cannot hang)."""
    data = np.empty(size, dtype=np.uint8)
    changed = DataError(f"{path}: changed while being read, try again")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as f:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or now.st_size != size:
                raise changed
            view, done = memoryview(data), 0
            while done < size and (got := f.readinto(view[done:])):
                done += got
            if done != size or f.read(1):
                raise changed
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return data


def load_split(root, split):
    """"train" or "test" -> (images uint8 tensor (N, 3, 32, 32), labels int64 tensor (N,))."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    parts = [read_records(os.path.join(root, name)) for name in SPLIT_FILES[split]]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _present(root):
    """All six batch files exist with the official size."""
    paths = [os.path.join(root, name) for files in SPLIT_FILES.values() for name in files]
    return all(os.path.isfile(p) and os.path.getsize(p) == RECORDS_PER_FILE * RECORD_BYTES
               for p in paths)


def download(root, url=URL, md5=MD5):
    """Fetch the official archive into `root`'s parent folder, check its md5, and extract the
    six batch files (and batches.meta.txt) into `root`, which appears only once complete.
    Concurrent calls (torchrun's processes, two runs) take turns: one downloads, the others
    find the data there."""
    root = os.path.abspath(root)
    if _present(root):
        return  # already there; load_split still validates every byte
    parent = os.path.dirname(root)
    _must_hold_only_cifar_files(root)  # before fetching 170 MB
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{os.path.basename(root)}.download-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _present(root):  # another process may have finished it while we waited
            _download_and_extract(root, url, md5)


def _must_hold_only_cifar_files(root):
    """A partial or damaged data set is replaced as a whole, so `root` must hold nothing else:
    a --data-dir that points at some other folder is refused, never emptied."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"{root}: is a file, expected a folder for the CIFAR-10 batches")
    if os.path.isdir(root):
        others = sorted(set(os.listdir(root)) - OFFICIAL_FILES)
        if others:
            raise DataError(f"{root}: incomplete CIFAR-10 folder that also holds "
                            f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}; "
                            "--download replaces this folder, so point --data-dir at a "
                            "cifar-10-batches-bin folder or a new one")


def _download_and_extract(root, url, md5):
    from torchvision.datasets.utils import check_integrity, download_url  # only needed here

    parent = os.path.dirname(root)
    archive = os.path.join(parent, os.path.basename(url))
    try:  # skips an archive that is already there with the right md5
        download_url(url, parent, os.path.basename(url), md5)
    except (OSError, RuntimeError, http.client.HTTPException) as e:  # URLError is an OSError;
        # HTTPException: e.g. IncompleteRead when a chunked response is cut off
        if os.path.exists(archive) and not check_integrity(archive, md5):
            os.remove(archive)  # a partial or corrupted archive must not be trusted later
            raise DataError(f"{archive}: md5 differs from {md5} (corrupted or interrupted "
                            "download); it was deleted, try again") from None
        raise DataError(f"{url}: download failed ({e})") from None
    wanted = {f"{ARCHIVE_DIR}/{name}" for files in SPLIT_FILES.values() for name in files}
    extracted = wanted | {f"{ARCHIVE_DIR}/batches.meta.txt"}  # nothing else, no path traversal
    staging = tempfile.mkdtemp(prefix=".cifar-extract-", dir=parent)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # one pass over the compressed stream
                if member.name in extracted and member.isfile():
                    with tar.extractfile(member) as src, \
                            open(os.path.join(staging, os.path.basename(member.name)), "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    wanted.discard(member.name)
        if wanted:
            raise DataError(f"{archive}: missing {', '.join(sorted(wanted))}")
        for split in SPLIT_FILES:  # validate before the data set becomes visible
            try:
                load_split(staging, split)
            except DataError as e:
                raise DataError(f"{archive}: bad contents: {e}") from None
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a data set is shared
        if os.path.isdir(root):
            _must_hold_only_cifar_files(root)  # still, after the download
            shutil.rmtree(root)
        os.replace(staging, root)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # zlib: corrupt deflate data
        raise DataError(f"{archive}: cannot extract ({e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_val_split(images, labels, val_size):
    """Hold out the last `val_size` training images (the paper's 45k/5k split: val_size=5000)."""
    if not 0 <= val_size < len(images):
        raise ValueError(f"val_size must be in [0, {len(images)}), got {val_size}")
    cut = len(images) - val_size
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def per_pixel_mean(images):
    """uint8 (N, 3, 32, 32) -> float32 (3, 32, 32): the mean image, summed in float64."""
    total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
    for chunk in images.split(10_000):
        total += chunk.sum(0, dtype=torch.float64)
    return (total / len(images)).float()


def augment(images, generator):
    """Pad with 4 zero pixels per side, take a uniform random 32x32 crop per image and flip it
    horizontally with p=0.5. uint8 (B, 3, 32, 32) -> uint8 (B, 3, 32, 32), on images' device."""
    batch, device = len(images), images.device
    padded = F.pad(images, (4, 4, 4, 4))  # (B, 3, 40, 40)
    offsets = torch.randint(0, 9, (batch, 2), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    span = torch.arange(32, device=device)
    rows = offsets[:, :1] + span  # (B, 32)
    cols = offsets[:, 1:] + torch.where(flip[:, None], span.flip(0), span)  # (B, 32)
    return padded[torch.arange(batch, device=device)[:, None, None, None],
                  torch.arange(3, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def normalize(images, mean):
    """uint8 (B, 3, 32, 32) -> float32 with the per-pixel mean subtracted (the only test-time
    preprocessing; at training time it follows `augment`, as in the authors' Caffe pipeline)."""
    return images.float() - mean
