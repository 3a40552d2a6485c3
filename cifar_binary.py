"""CIFAR-10 for Section 4.2 of He et al. 2015, and CIFAR-100, read from the official binary records.

A CIFAR-10 record is 3073 bytes: the label (0-9), then the 1024 red, 1024 green and 1024 blue
bytes of a 32x32 image, each plane row-major. `data_batch_1.bin` .. `data_batch_5.bin` hold the
50,000 training images, `test_batch.bin` the 10,000 test images, 10,000 records each.
A CIFAR-100 record is 3074 bytes: the coarse label (0-19), the fine label (0-99), then the same
3072 pixel bytes; `train.bin` holds the 50,000 training images, `test.bin` the 10,000 test
images. Nets learn the 100 fine labels.

Also here: the official archives' download, the per-pixel mean, and the paper's augmentation
("4 pixels are padded on each side, and a 32x32 crop is randomly sampled from the padded image
or its horizontal flip") as batched tensor code on any device.
"""
import contextlib
import http.client
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from experiment import DATA_FOLDERS

PIXEL_BYTES = 3 * 32 * 32  # the red, green and blue planes that end every record


@dataclass(frozen=True, eq=False)
class Dataset:
    """What differs between the binary versions of CIFAR-10 and CIFAR-100."""
    name: str  # in messages
    url: str  # the official archive
    md5: str  # of the official archive
    archive_dir: str  # the folder inside the archive, and the data folder's usual name
    env_var: str  # the environment variable users set to an extracted folder
    splits: dict  # {"train": {file name: records}, "test": {...}}, files in order
    label_names: tuple  # one per label byte at the start of a record
    label_counts: tuple  # how many values each label byte takes
    target: int  # the label byte the nets learn
    classes: tuple  # the target's class names, in label order
    meta_files: tuple  # extracted with the data files: the official class name lists
    other_files: tuple = ()  # also in the official folder, not extracted

    def __post_init__(self):
        if len(self.classes) != self.label_counts[self.target]:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for "
                             f"{self.label_counts[self.target]} labels")

    @property
    def record_bytes(self):
        return len(self.label_counts) + PIXEL_BYTES

    @property
    def num_classes(self):
        return len(self.classes)

    def layout(self, root, split=None):
        """[(path, records)] of the data files under `root`, of one split or of all, in order."""
        return [(os.path.join(root, name), records)
                for s, files in self.splits.items() if split in (None, s)
                for name, records in files.items()]

    @property
    def official_files(self):
        """What the official folder holds."""
        return ({name for files in self.splits.values() for name in files}
                | set(self.meta_files) | set(self.other_files))


CIFAR10 = Dataset(
    name="CIFAR-10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    md5="c32a1d4ab5d03f1284b67883e8d87530",  # of the official 170,052,171-byte archive
    env_var=DATA_FOLDERS["cifar10"][0],
    archive_dir=DATA_FOLDERS["cifar10"][1],
    splits={"train": {f"data_batch_{i}.bin": 10_000 for i in range(1, 6)},
            "test": {"test_batch.bin": 10_000}},
    label_names=("label",),
    label_counts=(10,),
    target=0,
    classes=("airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"),
    meta_files=("batches.meta.txt",),
    other_files=("readme.html",),
)

CIFAR100 = Dataset(
    name="CIFAR-100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    md5="03b5dce01913d631647c71ecec9e9cb8",  # of the official archive
    env_var=DATA_FOLDERS["cifar100"][0],
    archive_dir=DATA_FOLDERS["cifar100"][1],
    splits={"train": {"train.bin": 50_000}, "test": {"test.bin": 10_000}},
    label_names=("coarse label", "fine label"),
    label_counts=(20, 100),
    target=1,  # the fine label
    classes=(  # fine_label_names.txt, in label order
        "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
        "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
        "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
        "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
        "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower",
        "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
        "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
        "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit",
        "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
        "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
        "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train",
        "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm"),
    meta_files=("coarse_label_names.txt", "fine_label_names.txt"),
)

DATASETS = {"cifar10": CIFAR10, "cifar100": CIFAR100}

# CIFAR-10's layout under the names callers already use.
URL, ARCHIVE_DIR, CLASSES = CIFAR10.url, CIFAR10.archive_dir, CIFAR10.classes
SPLIT_FILES = {split: list(files) for split, files in CIFAR10.splits.items()}
RECORD_BYTES = CIFAR10.record_bytes
RECORDS_PER_FILE = 10_000


class DataError(Exception):
    """A data set problem the user can fix; the message is one line naming the file."""


def get_dataset(dataset):
    """A key of DATASETS ("cifar10", "cifar100") or a Dataset -> the Dataset."""
    if isinstance(dataset, Dataset):
        return dataset
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    return DATASETS[dataset]


def read_records(path, expected_records=RECORDS_PER_FILE, dataset="cifar10"):
    """One binary data file -> (uint8 array (R, 3, 32, 32), int64 array (R,)), validated; the
    labels are those the nets learn (CIFAR-100's fine labels). `expected_records=None` accepts
    any whole number of records.

    The file must be a regular file (or a symlink to one) whose size is checked before a byte
    is read: a FIFO, a device or a folder is refused, never read, so none can hang the reader
    or fill the memory."""
    ds = get_dataset(dataset)
    size = _regular_file_size(path, ds)
    if size % ds.record_bytes:
        raise DataError(f"{path}: {size:,} bytes is not a whole number of "
                        f"{ds.record_bytes}-byte records (truncated or not a {ds.name} "
                        "binary file)")
    count = size // ds.record_bytes
    if expected_records is not None and count != expected_records:
        raise DataError(f"{path}: {count:,} records, expected {expected_records:,}")
    records = _read_exactly(path, size).reshape(count, ds.record_bytes)
    labels = records[:, :len(ds.label_counts)]  # (R, 1) or (R, 2): coarse, fine
    bad = np.flatnonzero((labels >= np.array(ds.label_counts)).any(1))
    if bad.size:
        record = bad[0]
        byte = int(np.flatnonzero(labels[record] >= np.array(ds.label_counts))[0])
        raise DataError(f"{path}: record {record} has {ds.label_names[byte]} byte "
                        f"{labels[record, byte]}, expected 0-{ds.label_counts[byte] - 1} "
                        f"(not a {ds.name} binary file?)")
    images = records[:, len(ds.label_counts):].reshape(-1, 3, 32, 32)
    return images, labels[:, ds.target].astype(np.int64)


def _regular_file_size(path, ds):
    """The size of `path`, which must be a regular file; symlinks are followed, nothing opened."""
    try:
        mode_and_size = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; pass --download, or fetch {ds.url} "
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
        raise DataError(f"{path}: is {kind}{link}, expected a {ds.name} binary data file")
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


def load_split(root, split, dataset="cifar10"):
    """"train" or "test" -> (images uint8 tensor (N, 3, 32, 32), labels int64 tensor (N,))."""
    ds = get_dataset(dataset)
    if split not in ds.splits:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    parts = [read_records(path, records, ds) for path, records in ds.layout(root, split)]
    images = np.concatenate([images for images, _ in parts])  # a contiguous copy
    labels = np.concatenate([labels for _, labels in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _present(root, ds):
    """Every data file exists with the official size."""
    return all(os.path.isfile(path) and os.path.getsize(path) == records * ds.record_bytes
               for path, records in ds.layout(root))


def download(root, dataset="cifar10", url=None, md5=None):
    """Fetch the official archive (or `url`, checked against `md5`) into `root`'s parent
    folder, check its md5, and extract the data files and class name lists into `root`, which
    appears only once complete. Concurrent calls (torchrun's processes, two runs) take turns:
    one downloads, the others find the data there. One that fails leaves nothing behind that it
    made (the lock file, the folders it created), but a verified archive."""
    ds = get_dataset(dataset)
    url, md5 = ds.url if url is None else url, ds.md5 if md5 is None else md5
    root = os.path.abspath(root)
    if _present(root, ds):
        return  # already there; load_split still validates every byte
    parent = os.path.dirname(root)
    _must_hold_only_official_files(root, ds)  # before fetching 170 MB
    with _download_lock(parent, os.path.basename(root)):
        if not _present(root, ds):  # another process may have finished it while we waited
            _download_and_extract(root, url, md5, ds)


@contextlib.contextmanager
def _download_lock(parent, name):
    """Hold <parent>/.<name>.download-lock (flock) for a download into <parent>/<name>. If the
    download fails, the lock file is removed (while held) when this call created it, and so are
    the folders it created for it, if empty. A process that waited on a lock file so removed
    finds, once it holds it, that the path no longer names that file: it takes the lock again on
    the file now there (a new one, or the one a third process made), so only one process at a
    time ever holds the lock of the file at the path."""
    import fcntl  # here: POSIX only, and loading weights through torch.hub needs none of it
    path = os.path.join(parent, f".{name}.download-lock")
    while True:
        made, folder = [], parent  # the folders that makedirs creates, deepest first
        while not os.path.exists(folder):
            made.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        try:
            fd, created = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_WRONLY), False
            except FileNotFoundError:  # removed meanwhile by a download that failed
                continue
        except FileNotFoundError:  # its folder too
            continue
        with os.fdopen(fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or not os.path.samestat(os.fstat(lock.fileno()), now):
                continue  # removed while we waited: lock the file at the path now
            try:
                yield
            except BaseException:
                if created:
                    with contextlib.suppress(OSError):
                        os.remove(path)
                    for folder in made:  # those left empty: nothing of ours
                        try:
                            os.rmdir(folder)
                        except OSError:
                            break
                raise
            return


def _must_hold_only_official_files(root, ds):
    """A partial or damaged data set is replaced as a whole, so `root` must hold nothing else:
    a --data-dir that points at some other folder is refused, never emptied."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"{root}: is a file, expected a folder for the {ds.name} data files")
    if os.path.isdir(root):
        others = sorted(set(os.listdir(root)) - ds.official_files)
        if others:
            raise DataError(f"{root}: incomplete {ds.name} folder that also holds "
                            f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}; "
                            "--download replaces this folder, so point --data-dir at a "
                            f"{ds.archive_dir} folder or a new one")


def _download_and_extract(root, url, md5, ds):
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
    wanted = {f"{ds.archive_dir}/{name}" for files in ds.splits.values() for name in files}
    extracted = wanted | {f"{ds.archive_dir}/{name}" for name in ds.meta_files}  # nothing else,
    # no path traversal
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
        for split in ds.splits:  # validate before the data set becomes visible
            try:
                load_split(staging, split, ds)
            except DataError as e:
                raise DataError(f"{archive}: bad contents: {e}") from None
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a data set is shared
        if os.path.isdir(root):
            _must_hold_only_official_files(root, ds)  # still, after the download
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
