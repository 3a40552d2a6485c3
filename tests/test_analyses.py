"""The analysis scripts under results/ still run and measure what they say."""
import json
import os
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "results"))
import bf16_gradients  # noqa: E402
import training_fit  # noqa: E402
from test_plot_curves import make_run  # noqa: E402


def cells(line):
    return [cell.strip() for cell in line.strip("|\n ").split("|")]


def test_bf16_gradients_measures_each_difference_against_float32(synthetic_cifar, capsys):
    assert bf16_gradients.main(["--data-dir", synthetic_cifar, "--n", "1", "--batches", "2",
                                "init"]) == 0
    rows = {cells(line)[1]: cells(line)[2:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| init")}
    medians = {kind: float(row[0]) for kind, row in rows.items()}
    # bf16 and BN over 64 move the gradient, less than another batch does; float32 against
    # itself would give 0
    assert set(medians) == {"bf16", "BN over 64", "another batch"}
    assert all(m > 0.001 for m in medians.values()) and medians["bf16"] < medians["another batch"]
    assert float(rows["bf16"][4].rstrip("%")) > 0


def test_bf16_gradients_refuses_bad_input_in_one_line(synthetic_cifar, tmp_path, capsys):
    assert bf16_gradients.main(["--data-dir", synthetic_cifar, str(tmp_path / "none.pt")]) == 1
    assert bf16_gradients.main(["--data-dir", synthetic_cifar, "--batches", "1000", "init"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "none.pt" in err and "--batches 1000" in err


def test_bf16_gradients_refuses_damaged_or_foreign_weights_in_one_line(synthetic_cifar, tmp_path,
                                                                      capsys):
    import torch
    import run
    from resnet import ResNet
    torch.manual_seed(0)
    state = {"format": run.CHECKPOINT_FORMAT, "model": ResNet(1).state_dict(), "iteration": 0,
             "per_pixel_mean": torch.zeros(3, 32, 32),
             "config": {**run.experiment_config(run.parse_args(["1", "train"]))}}
    run.save_checkpoint(tmp_path / "model.pt", state, run.MODEL_KEYS)
    damaged = torch.load(tmp_path / "model.pt", weights_only=True)
    damaged["model"]["fc.weight"][0, 0] += 1  # a changed weight under the stored digest
    torch.save(damaged, tmp_path / "damaged.pt")
    foreign = dict(damaged, model=ResNet(2).state_dict(), digest=None)
    del foreign["digest"]
    torch.save(foreign, tmp_path / "foreign.pt")
    for name, says in (("damaged.pt", "damaged"), ("foreign.pt", "does not fit")):
        assert bf16_gradients.main(["--data-dir", synthetic_cifar, "--n", "1", "--batches", "1",
                                    str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err and says in err, err


def fit_run(logdir, name, stop_at=None, seed=0, lr=None):
    """A run of 1,000 iterations (lr/10 at 500 and 750) that logged training loss step/1000 and
    training error step/10 every 100 iterations, to `stop_at`, and lr(step) if given."""
    folder = make_run(str(logdir), name, iters=1000, stop_at=stop_at, events=False, seed=seed)
    writer = SummaryWriter(folder)
    for step in range(100, (stop_at or 1000) + 1, 100):
        writer.add_scalar("train/loss", step / 1000, step)
        writer.add_scalar("train/error", step / 10, step)
        if lr:
            writer.add_scalar("lr", lr(step), step)
    writer.close()
    return folder


def test_training_fit_averages_each_learning_rate_phase(tmp_path, capsys):
    done, stopped = fit_run(tmp_path, "done"), fit_run(tmp_path, "stopped", stop_at=600, seed=1)
    assert training_fit.main([done, stopped]) == 0
    rows = {cells(line)[0]: cells(line) for line in capsys.readouterr().out.splitlines()[2:]}
    # lr 0.1: windows ending at 100..500; lr 0.01: 600, 700; lr 0.001: 800..1000
    assert rows["done"][3:] == ["0.300 / 30.00", "0.650 / 65.00", "0.900 / 90.00", "8.00"]
    assert rows["stopped"][2:6] == ["1", "0.300 / 30.00", "0.600 / 60.00 (to 600)", "-"]
    assert training_fit.main(["--until", "600", done]) == 0
    assert cells(capsys.readouterr().out.splitlines()[2])[3:6] == [
        "0.300 / 30.00", "0.600 / 60.00", "-"]


def test_training_fit_leaves_the_warm_up_out_of_the_first_phase(tmp_path, capsys):
    # ResNet-110 trains its first windows at lr 0.01: they are not of the lr 0.1 phase.
    folder = fit_run(tmp_path, "warm", lr=lambda step: 0.01 if step <= 200 else
                     0.1 / 10 ** ((step > 500) + (step > 750)))
    assert training_fit.main([folder]) == 0
    # lr 0.1: windows ending at 300..500 only; the later phases as without a warm-up
    assert cells(capsys.readouterr().out.splitlines()[2])[3:6] == [
        "0.400 / 40.00", "0.650 / 65.00", "0.900 / 90.00"]


def test_training_fit_takes_a_config_json_without_log_every(tmp_path, capsys):
    folder = fit_run(tmp_path, "old", stop_at=600)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config["log_every"]
    with open(path, "w") as f:
        json.dump(config, f)
    assert training_fit.main([folder]) == 0
    assert cells(capsys.readouterr().out.splitlines()[2])[3:5] == [
        "0.300 / 30.00", "0.600 / 60.00 (to 600)"]


def test_training_fit_refuses_bad_input_in_one_line(tmp_path, capsys):
    done = fit_run(tmp_path, "done")
    other = make_run(str(tmp_path), "other", iters=2000)
    assert training_fit.main([done, str(tmp_path / "none")]) == 1
    assert training_fit.main([done, other]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "none: expected a run folder" in err
    assert "other: another schedule" in err
    with pytest.raises(SystemExit) as stop:
        training_fit.main(["--until", "0", done])
    assert stop.value.code == 2 and "--until" in capsys.readouterr().err
