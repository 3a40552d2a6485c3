"""run.py N test: finding the run without retyping its flags, and testing a run that another
process is still training."""
import json
import os
import shutil

import pytest

import plot_curves
import plumbing
import run
from test_run import few_test_images, sigterm_after, train

pytestmark = pytest.mark.slow  # trainings


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
    said = capsys.readouterr().out  # which folder it tests, and why that one
    assert said.count("\n") == 1 and f"{logdir}/resnet8-iters12-lr0.05" in said
    assert "only run" in said and "lr 0.05" in said
    assert found("1", "test", "--logdir", str(logdir), "--seed", "0", "--iters", "12") == \
        os.path.join(logdir, "resnet8-iters12", "checkpoint.pt")  # the name the flags give


def test_test_with_several_matching_runs_lists_them_and_asks_for_name(logdir, synthetic_cifar,
                                                                     capsys):
    before = set(os.listdir(logdir / "resnet8-iters12"))
    assert run.main(["1", "test", "--logdir", str(logdir), "--data-dir", synthetic_cifar]) == 1
    err = capsys.readouterr().err.splitlines()
    with open(logdir / "resnet8-iters12" / "result.json") as f:
        error = json.load(f)["test_error"]
    assert len(err) == 4 and "--name" in err[0]  # one line each: folder, where it stands
    for line, folder, stands in zip(err[1:], ("", "-lr0.05", "-seed1"),
                                    (f"{error:.2f}%", "iteration 4 of 12", f"{error:.2f}%")):
        assert f"{logdir}/resnet8-iters12{folder}:" in line and stands in line
    assert set(os.listdir(logdir / "resnet8-iters12")) == before  # nothing tested


def test_test_without_a_matching_run_says_so_in_one_line(logdir, synthetic_cifar, capsys):
    assert run.main(["1", "test", "--plain", "--logdir", str(logdir),
                     "--data-dir", synthetic_cifar]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{logdir}/plain8" in err and "plain-8" in err
    assert run.main(["1", "test", "--logdir", str(logdir), "--name", "other",  # no search
                     "--data-dir", synthetic_cifar]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{logdir}/other/checkpoint.pt" in err


def test_checkpoint_may_be_a_run_folder(logdir, tmp_path):
    folder = str(logdir / "resnet8-iters12")
    assert found("1", "test", "--checkpoint", folder) == os.path.join(folder, "checkpoint.pt")
    shared = tmp_path / "shared"  # a published or shared run: model.pt only
    shared.mkdir()
    shutil.copyfile(os.path.join(folder, "model.pt"), shared / "model.pt")
    assert found("1", "test", "--checkpoint", str(shared)) == str(shared / "model.pt")


@pytest.fixture
def in_training(logdir):
    """The stopped run's folder, locked as run.py's training holds it (pid 4242)."""
    folder = logdir / "resnet8-iters12-lr0.05"
    with plumbing.run_folder(str(logdir), folder.name, fresh=False):
        (folder / ".lock").write_text("4242")
        yield folder


def test_training_process_looks_at_the_lock_without_taking_or_making_one(in_training, tmp_path):
    assert run.training_process(str(in_training)) == "4242"
    assert run.training_process(str(tmp_path)) is None
    assert not os.path.exists(tmp_path / ".lock")


def test_test_of_a_run_in_training_says_so_and_plot_curves_leaves_it_out(
        in_training, logdir, synthetic_cifar, capsys):
    with few_test_images():
        assert run.main(["1", "test", "--logdir", str(logdir), "--name", in_training.name,
                         "--data-dir", synthetic_cifar]) == 0
    out = capsys.readouterr().out
    assert (f"note: {in_training} is being trained by another process (pid 4242): testing its "
            "checkpoint of iteration 4 of 12, not the run's final weights") in out
    with open(in_training / "test.json") as f:
        report = json.load(f)
    assert (report["iteration"], report["iters"], report["final_weights"],
            report["in_training"]) == (4, 12, False, True)
    assert plot_curves.main(["--logdir", str(logdir), "--out", str(logdir / "out")]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {in_training}/test.json: not of the run's final weights of iteration 4 "
            "of 12, tested while the run was training; left out of Figure 7") in err


def test_test_of_finished_weights_says_they_are_final(logdir, synthetic_cifar, capsys):
    folder = logdir / "resnet8-iters12"
    with few_test_images():
        assert run.main(["1", "test", "--checkpoint", str(folder), "--data-dir",
                         synthetic_cifar]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert all(line.startswith("note: N=1 builds a net of depth 8") for line in notes), notes
    with open(folder / "test.json") as f:
        report = json.load(f)
    assert (report["iteration"], report["iters"], report["final_weights"],
            report["in_training"]) == (12, 12, True, False)
    assert report["checkpoint"] == str(folder / "checkpoint.pt")


def test_testing_published_weights_leaves_their_folder_as_it_is(logdir, synthetic_cifar,
                                                                 tmp_path, capsys):
    published = tmp_path / "published"  # as results/runs/ holds a run: no checkpoint.pt
    published.mkdir()
    for name in ("model.pt", "config.json", "result.json"):
        shutil.copyfile(logdir / "resnet8-iters12" / name, published / name)
    before = {p.name: p.read_bytes() for p in published.iterdir()}
    with few_test_images():
        assert run.main(["1", "test", "--checkpoint", str(published / "model.pt"),
                         "--data-dir", synthetic_cifar]) == 0
        assert {p.name: p.read_bytes() for p in published.iterdir()} == before
        assert "--out" in capsys.readouterr().out
        out = tmp_path / "elsewhere.json"
        assert run.main(["1", "test", "--checkpoint", str(published / "model.pt"),
                         "--data-dir", synthetic_cifar, "--out", str(out)]) == 0
    with open(out) as f:
        assert json.load(f)["seed"] == 0


@pytest.mark.parametrize("older", [False, True])
def test_test_refuses_another_runs_checkpoint_in_a_run_folder(older, logdir, synthetic_cifar,
                                                             tmp_path, capsys):
    folder = tmp_path / "resnet8-iters12"  # seed 0's folder, holding a seed-1 checkpoint
    shutil.copytree(logdir / "resnet8-iters12", folder)
    (folder / "test.json").unlink(missing_ok=True)  # an earlier test may have tested this run
    if older:  # a config.json written before --dataset and --bn-batch, as the published runs'
        info = json.loads((folder / "config.json").read_text())
        for key in ("dataset", "bn_batch"):
            del info[key]
        (folder / "config.json").write_text(json.dumps(info))
    state = run.load_checkpoint(str(folder / "checkpoint.pt"), run.CHECKPOINT_KEYS)
    state["config"]["seed"] = 1
    run.save_checkpoint(str(folder / "checkpoint.pt"), state)
    assert run.main(["1", "test", "--checkpoint", str(folder),
                     "--data-dir", synthetic_cifar]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed 1" in err and "config.json" in err
    assert not (folder / "test.json").exists()


def test_a_file_that_is_no_checkpoint_is_refused_without_training_advice(synthetic_cifar,
                                                                         tmp_path, capsys):
    path = tmp_path / "passwd"
    path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert run.main(["1", "test", "--checkpoint", str(path), "--data-dir", synthetic_cifar]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "--fresh" not in err

