"""CIFAR-10 binary reader, mean, augmentation and split of Section 4.2 (cifar_binary.py), and
the CIFAR-100 reader."""
import os
import time

import numpy as np
import pytest
import torch

import cifar_binary
from cifar_binary import (CIFAR10, CIFAR100, DATASETS, DataError, augment, load_split, normalize,
                          per_pixel_mean, read_records, train_val_split)
from synthetic import records, write_dataset

ALL_FILES = cifar_binary.SPLIT_FILES["train"] + cifar_binary.SPLIT_FILES["test"]


def pixel_value(record, channel, row, col):
    """A byte that tells where it came from."""
    return [row + 32 * record, col + 64, (row * 7 + col + 11 * record) % 256][channel]


def coordinate_records(count, labels_of=lambda k: [3 * k % 10]):
    """`count` records, labels `labels_of(k)` (CIFAR-10: (3 * k) % 10), written byte by byte in
    the documented layout."""
    out = bytearray()
    for k in range(count):
        out.extend(labels_of(k))
        for channel in range(3):  # R plane, G plane, B plane, each row-major
            for row in range(32):
                for col in range(32):
                    out.append(pixel_value(k, channel, row, col))
    return bytes(out)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def linked_dataset(source, target, replace=None):
    """A copy of the data set at `source` made of symlinks, with `replace` = {name: bytes}."""
    os.makedirs(target)
    for name in ALL_FILES:
        if replace and name in replace:
            write(os.path.join(target, name), replace[name])
        else:
            os.symlink(os.path.join(source, name), os.path.join(target, name))
    return str(target)


@pytest.fixture(scope="module")
def synthetic_train(synthetic_cifar):
    return load_split(synthetic_cifar, "train")


# --- the record layout ---------------------------------------------------------------------

def test_record_layout_is_label_then_red_green_blue_planes_row_major(tmp_path):
    path = write(tmp_path / "b.bin", coordinate_records(4))
    images, labels = read_records(path, expected_records=4)
    assert images.dtype == np.uint8 and images.shape == (4, 3, 32, 32)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 3, 6, 9]
    k, c, r, w = np.meshgrid(range(4), range(3), range(32), range(32), indexing="ij")
    expected = np.choose(c, [r + 32 * k, w + 64, (r * 7 + w + 11 * k) % 256])
    np.testing.assert_array_equal(images, expected)
    assert images[2, 0, 5, 9] == 5 + 64 and images[2, 1, 5, 9] == 9 + 64  # R = row, G = col


def test_load_split_returns_uint8_images_and_int64_labels(synthetic_cifar, synthetic_train):
    images, labels = synthetic_train
    assert images.dtype == torch.uint8 and images.shape == (50_000, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (50_000,)
    test_images, test_labels = load_split(synthetic_cifar, "test")
    assert test_images.dtype == torch.uint8 and test_images.shape == (10_000, 3, 32, 32)
    assert test_labels.dtype == torch.int64 and test_labels.shape == (10_000,)


def test_train_split_is_the_five_batches_concatenated_in_order(synthetic_cifar, synthetic_train):
    images, labels = synthetic_train
    for i, name in enumerate(cifar_binary.SPLIT_FILES["train"]):
        with open(os.path.join(synthetic_cifar, name), "rb") as f:
            raw = f.read()
        for record in (0, 1, 9_999):  # first image of data_batch_2 is images[10000], ...
            data = raw[record * 3073:(record + 1) * 3073]
            assert labels[10_000 * i + record].item() == data[0]
            assert images[10_000 * i + record].numpy().tobytes() == data[1:]


def test_test_split_is_test_batch(synthetic_cifar):
    images, labels = load_split(synthetic_cifar, "test")
    with open(os.path.join(synthetic_cifar, "test_batch.bin"), "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8).reshape(10_000, 3073)
    np.testing.assert_array_equal(labels.numpy(), raw[:, 0])
    np.testing.assert_array_equal(images.numpy().reshape(10_000, -1), raw[:, 1:])


def test_unknown_split_is_rejected(synthetic_cifar):
    with pytest.raises(ValueError, match="'val'"):
        load_split(synthetic_cifar, "val")


# --- validation messages -----------------------------------------------------------------

@pytest.mark.parametrize("split,first", [("train", "data_batch_1.bin"), ("test", "test_batch.bin")])
def test_missing_file_message_names_it_and_says_how_to_get_it(tmp_path, split, first):
    with pytest.raises(DataError) as e:
        load_split(str(tmp_path), split)
    message = str(e.value)
    assert os.path.join(str(tmp_path), first) in message
    assert "--download" in message and cifar_binary.URL in message
    assert "\n" not in message


def test_partial_record_message_gives_the_size(tmp_path):
    path = write(tmp_path / "b.bin", records(2) + b"12345")
    with pytest.raises(DataError, match="6,151 bytes") as e:
        read_records(path, expected_records=None)
    assert path in str(e.value)


def test_bad_label_message_gives_the_first_bad_record(tmp_path):
    labels = [1, 2, 10, 3, 200]
    path = write(tmp_path / "b.bin", records(5, labels=labels))
    with pytest.raises(DataError, match=r"record 2 has label byte 10\b") as e:
        read_records(path, expected_records=5)
    assert path in str(e.value)


def test_wrong_record_count_is_rejected(tmp_path):
    path = write(tmp_path / "b.bin", records(2))
    with pytest.raises(DataError, match="2 records, expected 3"):
        read_records(path, expected_records=3)
    with pytest.raises(DataError, match="2 records, expected 10,000"):
        read_records(path)
    assert read_records(path, expected_records=2)[0].shape == (2, 3, 32, 32)


def test_load_split_rejects_a_batch_one_record_short(synthetic_cifar, tmp_path):
    root = linked_dataset(synthetic_cifar, tmp_path / "short",
                          {"data_batch_4.bin": records(9_999, seed=4)})
    with pytest.raises(DataError, match="9,999 records, expected 10,000") as e:
        load_split(root, "train")
    assert os.path.join(root, "data_batch_4.bin") in str(e.value)
    assert load_split(root, "test")[0].shape == (10_000, 3, 32, 32)  # the other split still loads


# --- CIFAR-100 ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_cifar100(tmp_path_factory):
    """A full-size CIFAR-100 binary data set of random images and labels."""
    root = tmp_path_factory.mktemp("cifar100") / "cifar-100-binary"
    return write_dataset(str(root), dataset="cifar100")


def test_the_data_sets_are_described_as_the_official_archives_hold_them():
    assert set(DATASETS) == {"cifar10", "cifar100"}
    assert CIFAR10.record_bytes == cifar_binary.RECORD_BYTES == 3073
    assert [(os.path.basename(p), n) for p, n in CIFAR10.layout("")] == [
        (name, 10_000) for name in ALL_FILES]
    assert CIFAR10.classes == cifar_binary.CLASSES and CIFAR10.num_classes == 10
    assert CIFAR100.record_bytes == 3074 and CIFAR100.num_classes == 100
    assert CIFAR100.layout("d") == [("d/train.bin", 50_000), ("d/test.bin", 10_000)]
    assert CIFAR100.archive_dir == "cifar-100-binary"
    assert CIFAR100.url == "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
    assert CIFAR100.md5 == "03b5dce01913d631647c71ecec9e9cb8"
    assert CIFAR100.official_files == {"train.bin", "test.bin", "coarse_label_names.txt",
                                       "fine_label_names.txt"}
    # fine_label_names.txt happens to list the classes alphabetically
    classes = CIFAR100.classes
    assert len(set(classes)) == 100 and list(classes) == sorted(classes)
    assert (classes[0], classes[1], classes[58], classes[99]) == (
        "apple", "aquarium_fish", "pickup_truck", "worm")


def test_cifar100_record_layout_is_coarse_then_fine_label_then_the_planes(tmp_path):
    path = write(tmp_path / "test.bin", coordinate_records(4, lambda k: [k % 20, 37 * k % 100]))
    images, labels = read_records(path, expected_records=4, dataset="cifar100")
    assert labels.dtype == np.int64 and labels.tolist() == [0, 37, 74, 11]  # the fine labels
    k, c, r, w = np.meshgrid(range(4), range(3), range(32), range(32), indexing="ij")
    expected = np.choose(c, [r + 32 * k, w + 64, (r * 7 + w + 11 * k) % 256])
    np.testing.assert_array_equal(images, expected)


def test_cifar100_splits_are_train_bin_and_test_bin_with_fine_labels(synthetic_cifar100):
    for split, name, count in (("train", "train.bin", 50_000), ("test", "test.bin", 10_000)):
        images, labels = load_split(synthetic_cifar100, split, dataset="cifar100")
        assert images.dtype == torch.uint8 and images.shape == (count, 3, 32, 32)
        assert images.is_contiguous()
        assert labels.dtype == torch.int64 and labels.shape == (count,)
        with open(os.path.join(synthetic_cifar100, name), "rb") as f:
            raw = np.frombuffer(f.read(), np.uint8).reshape(count, 3074)
        assert np.array_equal(labels.numpy(), raw[:, 1])  # (assert_array_equal: 7 s here)
        assert np.array_equal(images.numpy().reshape(count, -1), raw[:, 2:])
        assert labels.min() >= 0 and labels.max() == 99 and raw[:, 0].max() == 19


def test_cifar100_bad_label_messages_name_the_label_byte(tmp_path):
    data = bytearray(records(3, dataset="cifar100"))
    data[3074] = 20  # record 1's coarse label
    path = write(tmp_path / "test.bin", bytes(data))
    with pytest.raises(DataError) as e:
        read_records(path, expected_records=3, dataset="cifar100")
    assert str(e.value) == (f"{path}: record 1 has coarse label byte 20, expected 0-19 "
                            "(not a CIFAR-100 binary file?)")
    data[3074], data[2 * 3074 + 1] = 19, 100  # record 2's fine label
    path = write(tmp_path / "test.bin", bytes(data))
    with pytest.raises(DataError, match="record 2 has fine label byte 100, expected 0-99"):
        read_records(path, expected_records=3, dataset="cifar100")


def test_cifar10_records_are_not_cifar100_records(synthetic_cifar, tmp_path):
    os.symlink(os.path.join(synthetic_cifar, "test_batch.bin"), tmp_path / "test.bin")
    with pytest.raises(DataError) as e:
        load_split(str(tmp_path), "test", dataset="cifar100")
    assert str(e.value) == (f"{tmp_path / 'test.bin'}: 30,730,000 bytes is not a whole number of "
                            "3074-byte records (truncated or not a CIFAR-100 binary file)")


def test_cifar100_record_counts_are_checked_per_file(synthetic_cifar100, tmp_path):
    os.symlink(os.path.join(synthetic_cifar100, "test.bin"), tmp_path / "train.bin")
    os.symlink(os.path.join(synthetic_cifar100, "test.bin"), tmp_path / "test.bin")
    with pytest.raises(DataError) as e:
        load_split(str(tmp_path), "train", dataset="cifar100")
    assert str(e.value) == f"{tmp_path / 'train.bin'}: 10,000 records, expected 50,000"
    assert len(load_split(str(tmp_path), "test", dataset="cifar100")[0]) == 10_000


def test_cifar100_missing_file_message_names_it_and_the_cifar100_archive(tmp_path):
    with pytest.raises(DataError) as e:
        load_split(str(tmp_path), "test", dataset="cifar100")
    assert str(e.value) == (f"{tmp_path / 'test.bin'}: file not found; pass --download, or fetch "
                            f"{CIFAR100.url} and extract it so that this file exists")


def test_unknown_data_set_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="one of cifar10, cifar100, got 'cifar1000'"):
        load_split(str(tmp_path), "train", dataset="cifar1000")


# --- mean, normalisation, split ----------------------------------------------------------

@pytest.mark.parametrize("count", [1, 20_001, 50_000])
def test_per_pixel_mean_equals_float64_mean(synthetic_train, count):
    images = synthetic_train[0][:count]
    mean = per_pixel_mean(images)
    assert mean.dtype == torch.float32 and mean.shape == (3, 32, 32)
    expected = images.numpy().mean(0, dtype=np.float64).astype(np.float32)
    np.testing.assert_allclose(mean.numpy(), expected, rtol=1e-6, atol=0)


def test_normalize_subtracts_the_mean_without_uint8_wraparound():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 32, 32)
    mean = torch.full((3, 32, 32), 100.25)
    mean[1, 2, 3] = 7.0
    out = normalize(images, mean)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    assert out[0, 0, 0, 0].item() == -100.25 and out[1, 0, 0, 0].item() == 154.75
    assert out[1, 1, 2, 3].item() == 248.0
    assert torch.equal(out, images.float() - mean)


def test_train_val_split_holds_out_the_last_images():
    labels = torch.arange(20)
    images = labels.to(torch.uint8).view(20, 1, 1, 1).expand(20, 3, 32, 32)
    (train_x, train_y), (val_x, val_y) = train_val_split(images, labels, 5)
    assert train_y.tolist() == list(range(15)) and val_y.tolist() == list(range(15, 20))
    assert torch.equal(train_x, images[:15]) and torch.equal(val_x, images[15:])
    (again_x, again_y), _ = train_val_split(images, labels, 5)
    assert torch.equal(again_x, train_x) and torch.equal(again_y, train_y)
    (all_x, _), (none_x, _) = train_val_split(images, labels, 0)
    assert len(all_x) == 20 and len(none_x) == 0


# --- augmentation --------------------------------------------------------------------------

def coordinate_images(count):
    """R = row + 1, G = col + 1, B = a per-image tag; no zero anywhere."""
    out = torch.empty(count, 3, 32, 32, dtype=torch.uint8)
    out[:, 0] = torch.arange(1, 33, dtype=torch.uint8).view(32, 1)
    out[:, 1] = torch.arange(1, 33, dtype=torch.uint8).view(1, 32)
    out[:, 2] = (torch.arange(count) % 255 + 1).to(torch.uint8).view(count, 1, 1)
    return out


def recover_crops(out):
    """(row offset, col offset, flipped) into the 40x40 padded image, read off the coordinates.

    Output row 16 / col 16 always lies inside the image whatever the offsets (0..8)."""
    rows = out[:, 0].amax(2).long()  # (B, 32): row + 1 of every output row, 0 in padding
    cols = out[:, 1].amax(1).long()  # (B, 32): col + 1 (flipped or not), 0 in padding
    flipped = cols[:, 17] < cols[:, 16]
    row_offset = rows[:, 16] - 1 - 16 + 4
    col_offset = torch.where(flipped, cols[:, 16] - 1 - 15 + 4, cols[:, 16] - 1 - 16 + 4)
    return row_offset, col_offset, flipped


def reference_augment(images, row_offset, col_offset, flipped):
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    out = np.empty_like(images.numpy())
    for i in range(len(images)):
        r, c = int(row_offset[i]), int(col_offset[i])
        crop = padded[i, :, r:r + 32, c:c + 32]
        out[i] = crop[:, :, ::-1] if flipped[i] else crop
    return out


def test_augment_output_is_a_padded_crop_or_its_mirror_with_uniform_offsets():
    count = 4_500
    images = coordinate_images(count)
    original = images.clone()
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == (count, 3, 32, 32)
    assert torch.equal(images, original)  # input untouched

    row_offset, col_offset, flipped = recover_crops(out)
    # every output image is exactly that window of the zero-padded image (so padding is zero)
    np.testing.assert_array_equal(out.numpy(),
                                  reference_augment(images, row_offset, col_offset, flipped))

    expected = count / 9
    for offsets in (row_offset, col_offset):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 0  # 0 and 8 both occur, nothing else
        chi_square = ((counts - expected) ** 2 / expected).sum().item()
        assert chi_square < 35, counts.tolist()  # 8 degrees of freedom
    assert len(set(zip(row_offset.tolist(), col_offset.tolist()))) == 81
    assert 0.45 < flipped.float().mean().item() < 0.55
    padded_pixels = (out[:, 0] == 0).float().mean().item()  # about 1 - (32 - E|dx|)^2/32^2
    assert 0.05 < padded_pixels < 0.2


def test_augment_never_moves_content_out_of_place_for_random_images():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(3))
    tagged = coordinate_images(64)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = augment(images, gen_a)
    crops = recover_crops(augment(tagged, gen_b))  # same draws, so the same windows
    np.testing.assert_array_equal(out.numpy(), reference_augment(images, *crops))


def test_augment_is_reproducible_from_the_generator_seed():
    images = coordinate_images(256)
    a = augment(images, torch.Generator().manual_seed(7))
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_draws_afresh_on_each_call():
    images = coordinate_images(256)
    generator = torch.Generator().manual_seed(7)
    assert not torch.equal(augment(images, generator), augment(images, generator))


# --- the real data set (skipped unless CIFAR10_DIR is set) ---------------------------------

def test_real_cifar_has_50000_and_10000_images_balanced_over_classes(real_cifar):
    train_images, train_labels = load_split(real_cifar, "train")
    test_images, test_labels = load_split(real_cifar, "test")
    assert train_images.shape == (50_000, 3, 32, 32) and test_images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(train_labels, minlength=10).tolist() == [5_000] * 10
    assert torch.bincount(test_labels, minlength=10).tolist() == [1_000] * 10


def test_real_cifar_training_channel_means(real_cifar):
    images, _ = load_split(real_cifar, "train")
    channel_mean = per_pixel_mean(images).mean((1, 2)).double()
    assert channel_mean.tolist() == pytest.approx([125.307, 122.950, 113.865], abs=0.1)


def test_real_cifar_loads_all_60000_images_in_well_under_a_second(real_cifar):
    start = time.perf_counter()
    train, _ = load_split(real_cifar, "train")
    test, _ = load_split(real_cifar, "test")
    elapsed = time.perf_counter() - start
    print(f"loaded {len(train) + len(test):,} images in {elapsed:.3f} s")
    assert len(train) + len(test) == 60_000
    assert elapsed < 3.0
