"""run.py --dataset cifar100 on synthetic files in the official layout, and the checkpoints
written before --dataset existed (CIFAR-10 ones), which must still resume and test."""
import json
import os

import pytest
import torch

import cifar_binary
import run
from synthetic import write_dataset
from test_run import TINY, sigterm_after, train
from test_run_test import few_test_images

pytestmark = pytest.mark.slow  # trainings

PUBLISHED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "results", "runs", "resnet20-bf16", "model.pt")


@pytest.fixture(scope="module")
def synthetic_cifar100(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("cifar100") / "cifar-100-binary"),
                         dataset="cifar100")


@pytest.fixture(scope="module")
def cifar100_run(synthetic_cifar100, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logs")
    with few_test_images():
        assert run.main(["1", "train", "--dataset", "cifar100", "--data-dir", synthetic_cifar100,
                         "--logdir", str(logdir), *TINY, "--eval-every", "1000"]) == 0
    return logdir / "resnet8-cifar100-iters12"


def test_cifar100_trains_a_net_with_100_outputs_in_its_own_run_folder(cifar100_run):
    with open(cifar100_run / "config.json") as f:
        assert json.load(f)["dataset"] == "cifar100"
    state = run.load_checkpoint(str(cifar100_run / "model.pt"))
    assert state["config"]["dataset"] == "cifar100"
    assert state["model"]["fc.weight"].shape == (100, 64)
    assert os.path.exists(cifar100_run / "result.json")


def test_cifar100_test_reports_the_100_fine_classes(cifar100_run, synthetic_cifar100, capsys):
    with few_test_images():
        assert run.main(["1", "test", "--dataset", "cifar100", "--data-dir", synthetic_cifar100,
                         "--logdir", str(cifar100_run.parent)]) == 0  # found without --iters
    out = capsys.readouterr().out
    assert "ResNet-8 (option A) on CIFAR-100, iteration 12: test error" in out
    with open(cifar100_run / "test.json") as f:
        report = json.load(f)
    assert report["dataset"] == "cifar100"
    assert list(report["per_class_error"]) == list(cifar_binary.CIFAR100.classes)
    assert len(out.splitlines()) < 20  # the hardest and easiest classes; all in test.json


def test_cifar100_weights_are_not_tested_on_cifar10(cifar100_run, synthetic_cifar, capsys):
    assert run.main(["1", "test", "--checkpoint", str(cifar100_run),
                     "--data-dir", synthetic_cifar]) == 1
    err = capsys.readouterr().err
    assert "holds ResNet-8 (option A) on CIFAR-100" in err and "--dataset" in err


def test_resume_on_another_dataset_is_refused(cifar100_run, synthetic_cifar, capsys):
    assert train(synthetic_cifar, cifar100_run.parent, "--name", cifar100_run.name) == 1
    err = capsys.readouterr().err
    assert "dataset: run has cifar100, command has cifar10" in err


def written_before_datasets(path):
    """Rewrite the checkpoint at `path` as the code before --dataset wrote it: no "dataset" in
    its configuration, the same digest."""
    state = torch.load(path, weights_only=True)
    del state["config"]["dataset"]
    torch.save(state, path)
    return state


def test_checkpoints_from_before_datasets_resume_and_test_as_cifar10(synthetic_cifar, tmp_path,
                                                                     capsys):
    folder = tmp_path / "resnet8-iters12"
    with sigterm_after(4):
        assert train(synthetic_cifar, tmp_path, "--eval-every", "1000") == 128 + 15
    state = written_before_datasets(folder / "checkpoint.pt")
    assert state["digest"] == run.tensor_digest(state)  # the digest of the older code
    with open(folder / "config.json") as f:
        info = json.load(f)
    del info["dataset"]
    with open(folder / "config.json", "w") as f:
        json.dump(info, f)
    with few_test_images():
        assert train(synthetic_cifar, tmp_path, "--eval-every", "1000") == 0
        assert "resuming from iteration 4" in capsys.readouterr().out
        written_before_datasets(folder / "model.pt")
        assert run.main(["1", "test", "--checkpoint", str(folder / "model.pt"),
                         "--data-dir", synthetic_cifar]) == 0
    with open(folder / "test.json") as f:
        report = json.load(f)
    assert report["dataset"] == "cifar10" and report["final_weights"]
    assert list(report["per_class_error"]) == list(cifar_binary.CIFAR10.classes)


def test_published_weights_load_as_cifar10_with_their_digest():
    state = run.load_checkpoint(PUBLISHED)
    assert "dataset" not in torch.load(PUBLISHED, weights_only=True)["config"]
    assert state["config"]["dataset"] == "cifar10"
    run.verify_digest(PUBLISHED, state)
    model = run.build_model(state["config"], torch.device("cpu"))
    model.load_state_dict(state["model"])
    assert model.fc.out_features == 10
