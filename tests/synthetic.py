"""Small CIFAR-10- and CIFAR-100-format data sets written in the official binary layouts, for
tests."""
import os

import numpy as np

import cifar_binary


def records(count, seed=0, labels=None, dataset="cifar10"):
    """`count` random records as one bytes object: 3073 bytes each for CIFAR-10 (labels 0-9
    unless given), 3074 for CIFAR-100 (coarse labels 0-19, fine labels 0-99 unless given)."""
    ds = cifar_binary.get_dataset(dataset)
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(count, ds.record_bytes), dtype=np.uint8)
    for byte, values in enumerate(ds.label_counts):
        out[:, byte] = rng.integers(0, values, size=count)
    if labels is not None:
        out[:, ds.target] = labels
    return out.tobytes()


def write_dataset(root, seed=0, dataset="cifar10"):
    """Every data file of the data set, with the official record counts of random records."""
    os.makedirs(root, exist_ok=True)
    layout = cifar_binary.get_dataset(dataset).layout(root)
    for i, (path, count) in enumerate(layout):
        with open(path, "wb") as f:
            f.write(records(count, seed=seed * 10 + i, dataset=dataset))
    return root
