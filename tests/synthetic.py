"""Small CIFAR-10-format data sets written in the official binary layout, for tests."""
import os

import numpy as np

import cifar_binary


def records(count, seed=0, labels=None):
    """`count` random 3073-byte records as one bytes object (labels 0-9 unless given)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(count, cifar_binary.RECORD_BYTES), dtype=np.uint8)
    out[:, 0] = rng.integers(0, 10, size=count) if labels is None else labels
    return out.tobytes()


def write_dataset(root, seed=0):
    """The six batch files with 10,000 random records each (the official counts)."""
    os.makedirs(root, exist_ok=True)
    for i, name in enumerate(cifar_binary.SPLIT_FILES["train"] + cifar_binary.SPLIT_FILES["test"]):
        with open(os.path.join(root, name), "wb") as f:
            f.write(records(cifar_binary.RECORDS_PER_FILE, seed=seed * 10 + i))
    return root
