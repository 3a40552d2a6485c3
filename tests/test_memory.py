"""The memory check of run.py: plumbing.training_memory_bound is an upper bound on what training
takes, so that a run too large for the machine is refused with one line before it starts,
instead of growing into the out-of-memory killer.

    python tests/test_memory.py --data-dir DIR [--n 1 3] [--batch-size 32 128 512 2048]
        [--amp none bf16] [--compile] [--device cuda]

measures run.py's peak memory in short runs at several depths, batches and precisions, against
the bound (minutes): the table of training_memory_bound's docstring, and its check on a GPU."""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")  # before conftest, which may hide them
if __name__ == "__main__":  # run as a script: the project's modules, as conftest gives pytest
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run  # noqa: E402
from conftest import ROOT  # noqa: E402
from plumbing import World  # noqa: E402
from plumbing import RunError, available_memory, training_memory_bound  # noqa: E402
from test_run_hostile import command, one_line_error  # noqa: E402

SHORT_RUN = ["--iters", "2", "--log-every", "1", "--eval-every", "1000", "--ckpt-every", "1000"]


def peak_memory(argv, timeout=600, setup=None, env=None):
    """(exit code, stderr, peak resident bytes) of `python run.py *argv` in a child process:
    the whole process (Python, torch, the data set), as the kernel accounts it (wait4)."""
    with subprocess.Popen(command(*argv, setup=setup), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env) as child:
        timer = threading.Timer(timeout, child.kill)
        timer.start()
        try:
            err = child.stderr.read()
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, err, usage.ru_maxrss * 1024  # Linux: KiB


# run.py's peak GPU memory, printed as it exits: the caching allocator's peak plus what the
# process holds outside it (context, kernels, library workspaces), read at exit; other processes
# on the same GPU count too, so on a shared GPU this overstates the peak.
GPU_PEAK = """import atexit, torch
def report():
    if torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        outside = total - free - torch.cuda.memory_reserved()
        print("gpu peak", torch.cuda.max_memory_reserved() + outside, file=sys.stderr)
atexit.register(report)"""


def two_maps_per_layer(n, batch_size):
    """The former estimate, a lower bound: two float32 maps per image for each of the 6n 3x3
    convs (their output and the ReLU's)."""
    return 4 * batch_size * n * 2 * 2 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8)


@pytest.mark.slow
def test_the_bound_covers_the_measured_peak_of_a_short_run(synthetic_cifar, tmp_path):
    code, err, peak = peak_memory(["1", "train", "--batch-size", "64", "--data-dir",
                                   synthetic_cifar, "--logdir", tmp_path, "--threads", "1",
                                   *SHORT_RUN], timeout=120)
    assert code == 0, err[-2000:]
    bound = training_memory_bound(1, 64, "none", "cpu")
    assert peak < bound, f"peak {peak / 2**30:.2f} GiB, bound {bound / 2**30:.2f} GiB"


@pytest.mark.slow
def test_a_batch_that_fits_two_maps_per_layer_but_not_training_is_refused_before_it_starts(
        synthetic_cifar, tmp_path):
    """The case of `run.py 1 train --batch-size 50000` on a 24 GiB machine, sized to this
    machine's memory: N and a batch (at most the training set) whose two float32 maps per 3x3
    layer fit in 90% of the available memory, but whose training does not."""
    available = available_memory(torch.device("cpu"))
    if available is None:
        pytest.skip("this machine reports no available memory")
    per_n = two_maps_per_layer(1, 45_000)
    n = max(1, -(-int(0.9 * available) // per_n))
    batch = int(0.9 * available) // two_maps_per_layer(n, 1)
    assert 1 <= batch <= 45_000 and two_maps_per_layer(n, batch) < available
    assert training_memory_bound(n, batch, "none", "cpu") > available
    # Should the check let it through, the address-space limit makes the crash quick and
    # harmless for this machine.
    started = time.monotonic()
    result = subprocess.run(
        command(n, "train", "--batch-size", batch, "--data-dir", synthetic_cifar, "--logdir",
                tmp_path, setup="resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))"),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    error = one_line_error(result.stderr)
    assert f"N={n} " in error and f"batches of {batch} " in error and "GiB is available" in error
    assert "smaller --batch-size or N" in error
    assert os.listdir(tmp_path) == []  # refused before the run folder or the data
    assert time.monotonic() - started < 90  # no data loaded, no step taken


def test_the_bound_grows_with_depth_batch_and_precision():
    bound = training_memory_bound
    for device in ("cpu", "cuda"):
        for amp in ("none", "bf16"):
            assert bound(3, 4096, amp, device) < bound(9, 4096, amp, device) \
                < bound(18, 4096, amp, device)
            assert bound(3, 1024, amp, device) < bound(3, 4096, amp, device) \
                < bound(3, 16384, amp, device)
        assert bound(9, 4096, "bf16", device) < bound(9, 4096, "none", device)
    # Always more than the former lower bound, and far more at large batches.
    for n in (1, 3, 18, 200):
        for batch in (1, 128, 50_000):
            assert bound(n, batch, "bf16", "cpu") > two_maps_per_layer(n, batch)
        assert bound(n, 50_000, "none", "cpu") > 1.5 * two_maps_per_layer(n, 50_000)
    # ... yet every net of the paper but ResNet-1202 trains in 8 GiB at its batch of 128.
    assert bound(18, 128, "none", "cpu") < 8 * 2**30


def test_the_gpu_bound_counts_the_cuda_runtime_workspace_and_data_set(monkeypatch):
    assert training_memory_bound(3, 128, "none", "cuda") > 2 * 2**30 + 60_000 * 3072
    # What mem_get_info reports free is checked against it, with one line.
    monkeypatch.setattr(run, "available_memory", lambda device: 2 * 2**30)
    config = {"n": 3, "batch_size": 128, "amp": "bf16"}
    with pytest.raises(RunError) as refused:
        run.check_memory(config, World(), torch.device("cuda", 1))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("N=3 (depth 20) needs up to ")
    assert "batches of 128 on cuda:1 with --amp bf16" in message
    assert "but 2.0 GiB is available; use a smaller --batch-size or N" in message


def test_cpu_processes_of_one_node_share_its_memory(monkeypatch):
    each = training_memory_bound(1, 64, "none", "cpu")
    monkeypatch.setattr(run, "available_memory", lambda device: int(1.5 * each))
    config = {"n": 1, "batch_size": 128, "amp": "none"}
    run.check_memory(config, World(), torch.device("cpu"))  # one process at 128 would fit
    with pytest.raises(RunError, match="batches of 64 in each of 2 processes on cpu"):
        run.check_memory(config, World(rank=0, size=2, local_rank=0, local_size=2),
                         torch.device("cpu"))


def measure(args):
    """Print the table of training_memory_bound's docstring: run.py's peak memory (resident, or
    on --device cuda the GPU's) in short runs, against the bound."""
    env = dict(os.environ)  # conftest may hide the GPUs from the suite: not from this
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if GPUS is not None:
        env["CUDA_VISIBLE_DEVICES"] = GPUS
    print(f"| N | batch | amp | compile | peak {'GPU' if args.device == 'cuda' else 'RSS'} (GiB) "
          "| bound (GiB) | bound / peak | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for compiled in ([False, True] if args.compile else [False]):
        for n in args.n:
            for amp in args.amp:
                for batch in args.batch_size:
                    with tempfile.TemporaryDirectory() as logdir:
                        started = time.monotonic()
                        code, err, peak = peak_memory(
                            [n, "train", "--batch-size", batch, "--amp", amp, "--data-dir",
                             args.data_dir, "--logdir", logdir, "--device", args.device,
                             *SHORT_RUN, *(["--compile"] if compiled else [])],
                            setup=GPU_PEAK if args.device == "cuda" else None, env=env)
                    if code:
                        sys.exit(f"run.py failed ({code}): {err[-2000:]}")
                    if args.device == "cuda":
                        peak = int(next(line.split()[-1] for line in err.splitlines()
                                        if line.startswith("gpu peak ")))
                    bound = training_memory_bound(n, batch, amp, args.device)
                    print(f"| {n} | {batch} | {amp} | {'yes' if compiled else 'no'} | "
                          f"{peak / 2**30:.2f} | {bound / 2**30:.2f} | {bound / peak:.2f} | "
                          f"{time.monotonic() - started:.0f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=measure.__doc__)
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 binary folder (60,000 images)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32, 128, 512, 2048])
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also with --compile")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    measure(parser.parse_args())
