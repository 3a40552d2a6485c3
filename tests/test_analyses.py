"""The analysis scripts under results/ still run and measure what they say."""
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "results"))
import bf16_gradients  # noqa: E402


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
