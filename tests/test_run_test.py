"""run.py N test: finding the run without retyping its flags."""
import contextlib
import json
import os
import shutil

import pytest

import plot_curves
import run
from test_run import TINY, sigterm_after, train


@contextlib.contextmanager
def few_test_images():
    """Evaluations on the first 500 test images: these tests are about which weights are
    tested, not about the evaluation."""
    real = run.load_data
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "load_data", lambda args, split: tuple(
            t[:500] if split == "test" else t for t in real(args, split)))
        yield


@pytest.fixture(scope="module")
def logdir(synthetic_cifar, tmp_path_factory):
    """resnet8-iters12, finished; resnet8-iters12-seed1, the same run under another name; and
    resnet8-iters12-lr0.05, stopped at iteration 4 of 12 (no evaluation was due before)."""
    logdir = tmp_path_factory.mktemp("logs")
    with few_test_images():
        assert train(synthetic_cifar, logdir, "--eval-every", "1000") == 0
    shutil.copytree(logdir / "resnet8-iters12", logdir / "resnet8-iters12-seed1")
    with sigterm_after(4):
        assert train(synthetic_cifar, logdir, "--lr", "0.05") == 128 + 15
    return logdir


def found(*argv):
    """The checkpoint `run.py *argv` tests, without testing it."""
    return run.checkpoint_to_test(run.parse_args(list(argv)))


def test_test_without_the_training_flags_finds_the_only_matching_run(logdir, capsys):
    # --lr 0.05 narrows the three runs of ResNet-8 down to the stopped one
    path = found("1", "test", "--logdir", str(logdir), "--lr", "0.05")
    assert path == os.path.join(logdir, "resnet8-iters12-lr0.05", "checkpoint.pt")
    assert capsys.readouterr().out == (
        f"no run folder {logdir}/resnet8-lr0.05: testing {logdir}/resnet8-iters12-lr0.05, the "
        f"only run of ResNet-8 (option A), lr 0.05 under {logdir}\n")
    assert found("1", "test", "--logdir", str(logdir), "--seed", "0", "--iters", "12") == \
        os.path.join(logdir, "resnet8-iters12", "checkpoint.pt")  # the name the flags give


def test_test_with_several_matching_runs_lists_them_and_asks_for_name(logdir, synthetic_cifar,
                                                                     capsys):
    before = set(os.listdir(logdir / "resnet8-iters12"))
    assert run.main(["1", "test", "--logdir", str(logdir), "--data-dir", synthetic_cifar]) == 1
    err = capsys.readouterr().err.splitlines()
    with open(logdir / "resnet8-iters12" / "result.json") as f:
        error = json.load(f)["test_error"]
    assert err == [
        f"error: 3 runs of ResNet-8 (option A) under {logdir}; pass the --name of the one to test:",
        f"  {logdir}/resnet8-iters12: finished, 12 iterations, test error {error:.2f}%",
        f"  {logdir}/resnet8-iters12-lr0.05: iteration 4 of 12, unfinished",
        f"  {logdir}/resnet8-iters12-seed1: finished, 12 iterations, test error {error:.2f}%"]
    assert set(os.listdir(logdir / "resnet8-iters12")) == before  # nothing tested


def test_test_without_a_matching_run_says_so_in_one_line(logdir, synthetic_cifar, capsys):
    assert run.main(["1", "test", "--plain", "--logdir", str(logdir),
                     "--data-dir", synthetic_cifar]) == 1
    assert capsys.readouterr().err == (
        f"error: {logdir}/plain8: no run there, nor any other run of plain-8 with a checkpoint "
        f"under {logdir}; pass the run's --name, or --checkpoint\n")
    assert run.main(["1", "test", "--logdir", str(logdir), "--name", "other",  # no search
                     "--data-dir", synthetic_cifar]) == 1
    assert capsys.readouterr().err == \
        f"error: {logdir}/other/checkpoint.pt: no checkpoint there\n"


def test_checkpoint_may_be_a_run_folder(logdir, tmp_path):
    folder = str(logdir / "resnet8-iters12")
    assert found("1", "test", "--checkpoint", folder) == os.path.join(folder, "checkpoint.pt")
    shared = tmp_path / "shared"  # a published or shared run: model.pt only
    shared.mkdir()
    shutil.copyfile(os.path.join(folder, "model.pt"), shared / "model.pt")
    assert found("1", "test", "--checkpoint", str(shared)) == str(shared / "model.pt")
