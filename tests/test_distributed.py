"""run.py under torchrun: two CPU processes with gloo, on synthetic data."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddp
import run
from conftest import ROOT

pytestmark = pytest.mark.slow  # torchrun and spawned processes

FLAGS = ["--log-every", "2", "--eval-every", "1000", "--threads", "1"]


def torchrun(data, logdir, *extra, processes=2, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={processes}", os.path.join(ROOT, "run.py"), "1", "train",
         "--data-dir", data, "--logdir", str(logdir), *FLAGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=None if env is None else {**os.environ, **env})


def single(data, logdir, *extra):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "run.py"), "1", "train", "--data-dir", data,
         "--logdir", str(logdir), *FLAGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def checkpoint_of(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


def test_two_processes_train_with_the_global_batch_and_save_a_plain_checkpoint(
        synthetic_cifar, tmp_path):
    # --ckpt-every 1: the processes' weights are compared before every save
    code, out, err = finish(torchrun(synthetic_cifar, tmp_path, "--iters", "6", "--ckpt-every", "1"))
    assert code == 0, err
    folder = tmp_path / "resnet8-iters6"
    assert out.count("test error") == 1  # only rank 0 reports
    state = checkpoint_of(folder)
    assert state["iteration"] == 6
    assert not any(k.startswith("module.") for k in state["model"])
    assert (folder / "result.json").exists()
    code = run.main(["1", "test", "--checkpoint", str(folder / "checkpoint.pt"),
                     "--data-dir", synthetic_cifar])
    assert code == 0


def test_sync_bn_matches_one_process_with_the_same_global_batch(synthetic_cifar, tmp_path):
    code, _, err = finish(torchrun(synthetic_cifar, tmp_path / "two", "--iters", "2", "--sync-bn"))
    assert code == 0, err
    code, _, err = finish(single(synthetic_cifar, tmp_path / "one", "--iters", "2", "--sync-bn"))
    assert code == 0, err
    two = checkpoint_of(tmp_path / "two" / "resnet8-iters2-bn128")["model"]
    one = checkpoint_of(tmp_path / "one" / "resnet8-iters2-bn128")["model"]
    # float32 rounding leaves ~2e-5 here; per-process BN statistics would differ by ~7e-4
    # in the weights and by ~30 in the running variances (of raw-pixel-scale activations)
    for key, value in one.items():
        difference = (two[key].double() - value.double()).abs().max().item()
        assert difference <= 1e-4 * max(1.0, value.double().abs().max().item()), key


def test_one_process_trains_by_default_as_two_processes_of_64_images_do(synthetic_cifar,
                                                                          tmp_path):
    steps = ["--iters", "3", "--name", "net"]
    code, _, err = finish(torchrun(synthetic_cifar, tmp_path / "two", *steps))
    assert code == 0, err
    for logdir, bn in (("one", []), ("whole", ["--bn-batch", "128"])):
        code, _, err = finish(single(synthetic_cifar, tmp_path / logdir, *steps, *bn))
        assert code == 0, err
    two, one, whole = (checkpoint_of(tmp_path / d / "net") for d in ("two", "one", "whole"))
    assert two["config"]["bn_batch"] == one["config"]["bn_batch"] == 64
    assert whole["config"]["bn_batch"] == 128

    def apart(a, b):  # each weight and BN buffer, relative to its scale
        return {k: (a[k].double() - v.double()).abs().max().item()
                   / max(1.0, v.double().abs().max().item()) for k, v in b.items()}
    # float32 rounding: ~1e-5 here; BN over all 128 images moves weights and buffers far more
    assert max(apart(two["model"], one["model"]).values()) <= 1e-4
    assert max(apart(two["model"], whole["model"]).values()) > 1e-3


def test_batch_size_must_divide_among_the_processes(synthetic_cifar, tmp_path):
    code, _, err = finish(torchrun(synthetic_cifar, tmp_path, "--iters", "4", "--batch-size", "127"))
    assert code != 0
    assert "must divide evenly among the 2 processes" in err


def test_killed_process_fails_the_job_and_it_resumes_with_another_process_count(
        synthetic_cifar, tmp_path):
    folder = tmp_path / "resnet8-iters3000"
    job = torchrun(synthetic_cifar, tmp_path, "--iters", "3000", "--ckpt-every", "4",
                   "--dist-timeout", "30")
    deadline = time.time() + 180
    while time.time() < deadline and not (folder / "checkpoint.pt").exists():
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    code, _, err = finish(job, timeout=120)  # fails within the timeout, never hangs
    assert code != 0
    iteration = checkpoint_of(folder)["iteration"]
    assert 0 < iteration < 3000
    # Two processes normalised over 64 images each, as one process does by default.
    resumed = single(synthetic_cifar, tmp_path, "--iters", "3000", "--ckpt-every", "4")
    time.sleep(0.5)
    deadline = time.time() + 120
    while time.time() < deadline and checkpoint_of(folder)["iteration"] <= iteration:
        time.sleep(0.1)
    resumed.send_signal(signal.SIGTERM)
    code, out, err = finish(resumed)
    assert f"resuming from iteration {iteration}" in out
    assert code == 128 + signal.SIGTERM, err
    assert checkpoint_of(folder)["iteration"] > iteration


def test_a_signal_to_torchrun_stops_cpu_processes_after_the_step_with_a_checkpoint(
        synthetic_cifar, tmp_path):
    # torchrun kills its processes a while after passing a signal on (30 s by default, 3 here);
    # a window of 1,000 iterations would not end by then: they must stop after the step.
    flags = ["--iters", "100000", "--log-every", "1000", "--ckpt-every", "100000"]
    folder = tmp_path / "resnet8-iters100000"
    job = torchrun(synthetic_cifar, tmp_path, *flags, env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"})
    deadline = time.time() + 180
    while time.time() < deadline and not list(folder.glob("events.out.tfevents.*")):
        time.sleep(0.1)  # the event file opens once the signal handlers are in place
    time.sleep(2)  # some steps
    job.send_signal(signal.SIGTERM)
    finish(job, timeout=120)
    state = checkpoint_of(folder)
    assert 0 < state["iteration"] < 1000
    assert state["window"][2].item() == 128 * state["iteration"]  # every process's part, once


def kill_after_checkpoint(job, folder, after):
    """Wait for a checkpoint past iteration `after`, then kill the whole torchrun job."""
    deadline = time.time() + 180
    while time.time() < deadline and job.poll() is None:
        if (folder / "checkpoint.pt").exists() and checkpoint_of(folder)["iteration"] > after:
            break
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
    for pid in [int(p) for p in workers.stdout.split()] + [job.pid]:  # not one group: each
        os.kill(pid, signal.SIGKILL)
    job.communicate()
    return checkpoint_of(folder)


def test_a_checkpoint_mid_window_holds_every_process_part_of_the_window_once(
        synthetic_cifar, tmp_path):
    # No window ends before 1000: the saved window covers every image trained on so far, each
    # counted once, when it is written by two processes and after two processes resumed it.
    flags = ["--iters", "3000", "--ckpt-every", "2", "--log-every", "1000"]
    folder = tmp_path / "resnet8-iters3000"
    first = kill_after_checkpoint(torchrun(synthetic_cifar, tmp_path, *flags), folder, 0)
    assert first["window"][2].item() == 128 * first["iteration"]
    second = kill_after_checkpoint(torchrun(synthetic_cifar, tmp_path, *flags), folder,
                                   first["iteration"])
    assert second["window"][2].item() == 128 * second["iteration"]


def _diverge(rank, port, verdicts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, 1.0)
    torch.nn.init.constant_(model.bias, 0.5)
    verdicts.put(("same", ddp.ranks_agree(model)))
    torch.nn.init.constant_(model.weight, 1.0 + rank * 1e-6)
    verdicts.put(("perturbed", ddp.ranks_agree(model)))
    dist.destroy_process_group()


def test_ranks_whose_weights_differ_are_caught():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    verdicts = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_diverge, args=(port, verdicts), nprocs=2)
    results = sorted(verdicts.get() for _ in range(4))
    assert results == [("perturbed", False)] * 2 + [("same", True)] * 2


@pytest.mark.parametrize("world", [1, 2])
def test_the_global_batch_is_split_into_disjoint_shards(world):
    order = run.BatchOrder(seed=0, size=1000, batch_size=128, device="cpu")
    per_rank = 128 // world
    shards = [order(5)[slice(r * per_rank, (r + 1) * per_rank)] for r in range(world)]
    together = torch.cat(shards)
    assert torch.equal(together, order(5)) and len(set(together.tolist())) == 128
