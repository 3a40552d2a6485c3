"""bench.py: a tiny run prints a well-formed report; the FLOP counts match the published
figures; data errors are one line; fp32 is IEEE float32. No timing is asserted: speeds depend on
the machine and its load."""
import pytest
import torch

import bench

# Forward multiply-accumulates per image usually quoted for the CIFAR ResNets (conv + fc),
# counted by hand: sum over layers of output elements x weights per output channel.
PUBLISHED_MACS = {20: 40_551_040, 56: 125_485_696, 110: 252_887_680}
FIRST_CONV_MACS = 32 * 32 * 16 * 3 * 9  # 3 -> 16 channels at 32x32: no gradient to the data
COLUMNS = ["depth", "pipeline", "train img/s", "speed-up vs reference", "train GFLOP/s",
           "ms/step", "convs alone ms/step", "convs-alone bound", "eval img/s"]


@pytest.mark.parametrize("depth", sorted(PUBLISHED_MACS))
def test_flop_counter_gives_the_published_figures(depth):
    forward, _ = bench.step_flops(depth)
    assert forward == 2 * PUBLISHED_MACS[depth] * bench.BATCH  # 2 FLOPs per MAC, exactly


@pytest.mark.parametrize("depth", sorted(PUBLISHED_MACS))
def test_backward_is_measured_twice_the_forward_but_the_datas_gradient(depth):
    forward, backward = bench.step_flops(depth)
    # Each layer's gradients to its weights and to its input cost one forward each, but for the
    # first conv, whose input is the data.
    assert backward == 2 * forward - 2 * FIRST_CONV_MACS * bench.BATCH


@pytest.mark.parametrize("depth", [8, 20])
def test_conv_problems_are_every_conv_of_a_step_in_the_pipelines_layout(depth):
    problems = bench.conv_problems(depth, torch.channels_last, torch.bfloat16, torch.device("cpu"))
    assert len(problems) == depth - 1  # 6n+1 3x3 convs; option A adds none
    macs = sum(grad[0].numel() * w[0].numel() for x, w, grad, *_ in problems)  # per image
    forward, _ = bench.step_flops(depth)
    assert macs + 64 * 10 == forward / 2 / bench.BATCH  # the same convs as the FLOP counter's fc
    for x, w, grad, stride, padding, input_grad in problems:
        assert x.shape[0] == grad.shape[0] == bench.BATCH
        assert x.dtype == w.dtype == grad.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.nn.functional.conv2d(x, w, None, stride, padding).shape == grad.shape
    assert [p[-1] for p in problems] == [False] + [True] * (depth - 2)  # no grad for the data


def test_depths_must_be_6n_plus_2():
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--depths", "21"])


@pytest.mark.parametrize("device, complaint", [
    ("cuda", "CUDA is not available on this machine"),
    ("gpu", "expected auto, cpu, cuda or cuda:K")])
def test_a_device_this_machine_lacks_is_a_usage_error(device, complaint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", device])
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "broken link"])
def test_a_data_dir_that_exists_but_is_no_folder_is_a_usage_error_not_synthetic_images(
        kind, tmp_path, monkeypatch, capsys):
    path = tmp_path / "cifar.tar.gz"
    if kind == "file":
        path.write_bytes(b"not a folder")
    else:
        path.symlink_to(tmp_path / "moved-away")

    def benchmark(*args):
        raise AssertionError("benchmarked on synthetic images")
    monkeypatch.setattr(bench, "benchmark", benchmark)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--data-dir", str(path), "--device", "cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in error and "--data-dir" in error and str(path) in error


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def number(cell):
    return float(cell.replace(",", "").removesuffix("x"))


@pytest.mark.slow
def test_tiny_run_prints_one_row_per_pipeline_with_positive_ratios(tmp_path, capsys,
                                                                   restore_threads,
                                                                   restore_float32_settings):
    argv = ["--depths", "8", "--precisions", "fp32", "bf16", "--warmup", "1", "--windows", "2",
            "--steps", "2", "--eval-images", "64", "--workers", "0", "--threads", "1",
            "--data-dir", str(tmp_path / "absent")]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out

    assert "SYNTHETIC" in out
    assert "(fp32_precision: cuDNN conv ieee, cuBLAS matmul ieee, oneDNN conv ieee, " in out
    assert f"- command: python bench.py {' '.join(argv)}" in out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == COLUMNS
    assert set(table[1].strip("|").split("|")) == {"---"}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(r[0], r[1]) for r in rows] == [("8", "reference fp32"), ("8", "ours fp32"),
                                            ("8", "ours bf16")]
    for r in rows:
        assert r[3].endswith("x") and r[7].endswith("x")
        assert all(number(cell) > 0 for cell in r[2:])
        reference_ms, convs_ms = number(rows[0][5]), number(r[6])  # printed to 0.1 ms
        bound = reference_ms / convs_ms
        rounding = bound * (0.05 / reference_ms + 0.05 / convs_ms) + 0.005
        assert number(r[7]) == pytest.approx(bound, abs=rounding)
    assert number(rows[0][3]) == 1.0
    assert "- convs-alone bound:" in out
    assert "- data load: not measured (synthetic images)" in out
    assert "ResNet-8 ours fp32" in out and "ResNet-8 ours bf16" in out  # augmentation shares
    assert "FlopCounterMode" in out and "ResNet-8 " in out.split("- FLOPs per image")[1]
