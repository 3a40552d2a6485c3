"""run.py on a CUDA GPU, each test in subprocesses that see the GPUs (the rest of the suite is
pinned to the CPU); skipped on machines without one."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow  # subprocesses on a GPU

FLAGS = ["--iters", "30", "--log-every", "5", "--eval-every", "10", "--ckpt-every", "5",
         "--device", "cuda", "--deterministic"]


def start(env, data, logdir, *extra):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "1", "train",
                             "--data-dir", data, "--logdir", str(logdir), *FLAGS, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return out


def checkpoint_of(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_a_deterministic_gpu_run_killed_and_resumed_ends_bit_identical(
        amp, gpu_environment, synthetic_cifar, tmp_path):
    once = tmp_path / "once"
    finished(start(gpu_environment, synthetic_cifar, once, "--amp", amp))
    killed = tmp_path / "killed"
    process = start(gpu_environment, synthetic_cifar, killed, "--amp", amp)
    name = os.listdir(once)[0]
    while not (killed / name / "checkpoint.pt").exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished(start(gpu_environment, synthetic_cifar, killed, "--amp", amp))
    a, b = checkpoint_of(once / name), checkpoint_of(killed / name)
    assert a["iteration"] == b["iteration"] == 30
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_gpu_checkpoints_load_on_the_cpu(gpu_environment, synthetic_cifar, tmp_path):
    finished(start(gpu_environment, synthetic_cifar, tmp_path, "--iters", "5"))
    [name] = os.listdir(tmp_path)
    for file in ("checkpoint.pt", "model.pt"):
        state = torch.load(tmp_path / name / file, weights_only=True)  # no map_location
        tensors = [t for part in ("model", "per_pixel_mean") for t in
                   (state[part].values() if isinstance(state[part], dict) else [state[part]])]
        assert all(t.device.type == "cpu" for t in tensors), file
