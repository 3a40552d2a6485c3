"""The GPU path, tested on the CPU where it can be: device selection under torchrun (with the
GPU count simulated), float32 meaning float32, deterministic kernels on request, checkpoints
that load without a GPU, one process downloading, and errors from every process."""
import os
import subprocess
import sys

import pytest
import torch

import plumbing
import run
from conftest import ROOT


def test_the_suite_runs_on_the_cpu_even_where_there_are_gpus():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()
    assert run.pick_device("auto").type == "cpu"


@pytest.fixture
def gpus(monkeypatch):
    """A node with `count` GPUs, as torch sees it, and torchrun's variables for `processes`."""
    def node(count, processes=1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        for key, value in (("RANK", 0), ("WORLD_SIZE", processes), ("LOCAL_RANK", 0),
                           ("LOCAL_WORLD_SIZE", processes)):
            monkeypatch.setenv(key, str(value))
    return node


@pytest.mark.parametrize("count, processes, device, complaint", [
    (2, 2, "cuda:1", "each process takes the GPU of its local rank"),
    (2, 2, "cuda:0", "each process takes the GPU of its local rank"),
    (2, 4, "cuda", "4 processes on this node, but it has 2 GPU(s)"),
    (2, 4, "auto", "4 processes on this node, but it has 2 GPU(s)"),
    (1, 1, "cuda:1", "this machine has 1 CUDA device(s)"),
])
def test_device_choices_that_cannot_work_are_usage_errors(gpus, count, processes, device,
                                                          complaint, capsys):
    gpus(count, processes)
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["3", "train", "--device", device])
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


@pytest.mark.parametrize("count, processes, device", [
    (2, 2, "cuda"), (2, 2, "auto"), (4, 2, "auto"), (2, 4, "cpu"), (2, 1, "cuda:1")])
def test_device_choices_that_work_are_accepted(gpus, count, processes, device):
    gpus(count, processes)
    assert run.parse_args(["3", "train", "--device", device]).device == device


def test_sync_bn_with_compile_is_refused_until_measured(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["3", "train", "--sync-bn", "--compile"])
    assert "--sync-bn with --compile" in capsys.readouterr().err


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic = before[1]


def test_float32_is_ieee_float32_unless_tf32_is_asked_for(restore_float32_settings,
                                                           restore_determinism):
    run.setup_machine(run.parse_args(["1", "train", "--threads", "2"]))
    assert {s.fp32_precision for s in run.float32_settings().values()} == {"ieee"}
    run.setup_machine(run.parse_args(["1", "train", "--threads", "2", "--tf32"]))
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_deterministic_asks_every_library_for_deterministic_kernels(restore_float32_settings,
                                                                    restore_determinism,
                                                                    monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    run.setup_machine(run.parse_args(["1", "train", "--threads", "2", "--deterministic"]))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


class OnAnotherDevice(torch.Tensor):
    """Stands in for a GPU tensor: `.cpu()` gives a plain CPU tensor."""

    def cpu(self):
        return torch.Tensor._make_subclass(torch.Tensor, self)


def test_checkpoints_are_written_with_cpu_tensors_only(tmp_path):
    on_device = lambda: torch.Tensor._make_subclass(OnAnotherDevice, torch.ones(2))
    state = {"model": {"w": on_device()}, "optimizer": {"state": {0: {"m": on_device()}},
                                                        "param_groups": [{"lr": 0.1}]},
             "window": on_device(), "rng": {"torch": on_device()}}
    moved = run.on_cpu(state)
    leaves = [moved["model"]["w"], moved["optimizer"]["state"][0]["m"], moved["window"],
              moved["rng"]["torch"]]
    assert all(type(t) is torch.Tensor for t in leaves)
    assert moved["optimizer"]["param_groups"] == [{"lr": 0.1}]


@pytest.mark.parametrize("world, expected", [
    (plumbing.World(0, 2, 0, 1), ["download", "barrier", "download", "barrier"]),
    (plumbing.World(1, 2, 0, 1), ["barrier", "download", "barrier"]),  # first on another node
    (plumbing.World(1, 2, 1, 2), ["barrier", "barrier"]),
])
def test_one_process_downloads_while_the_others_wait(world, expected, monkeypatch):
    calls = []
    monkeypatch.setattr(run.cifar_binary, "download", lambda root, dataset: calls.append("download"))
    monkeypatch.setattr(run.dist, "barrier", lambda: calls.append("barrier"))
    run.fetch_data(run.parse_args(["1", "train", "--download"]), world)
    assert calls == expected


def torchrun(script, tmp_path, *argv):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.slow
def test_an_error_in_any_process_is_printed_with_its_rank(synthetic_cifar, tmp_path):
    script = tmp_path / "only_rank_1_fails.py"
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport cifar_binary, run\n"
        "if os.environ['RANK'] == '1':\n"
        "    def broken(*args, **kwargs):\n"
        "        raise cifar_binary.DataError('data_batch_1.bin: missing on this node')\n"
        "    cifar_binary.load_split = broken\n"
        "sys.exit(run.main(sys.argv[1:]))\n")
    result = torchrun(script, tmp_path, "1", "train", "--data-dir", synthetic_cifar,
                      "--iters", "2", "--threads", "1", "--dist-timeout", "30")
    assert result.returncode != 0
    assert "error: [rank 1] data_batch_1.bin: missing on this node" in result.stderr


@pytest.mark.slow
def test_under_torchrun_each_evaluation_is_reported_once(synthetic_cifar, tmp_path):
    result = torchrun(os.path.join(ROOT, "run.py"), tmp_path, "1", "train", "--data-dir",
                      synthetic_cifar, "--iters", "4", "--eval-every", "2", "--log-every", "2",
                      "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("iter 2: test error") == 1


@pytest.mark.slow
def test_running_out_of_gpu_memory_is_one_line(synthetic_cifar, tmp_path, monkeypatch, capsys):
    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(run.TrainingRun, "step", out_of_memory)
    assert run.main(["1", "train", "--data-dir", synthetic_cifar, "--logdir", str(tmp_path),
                     "--iters", "4", "--threads", "2"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: out of GPU memory with N=1 and batches of 128 (CUDA out of")
