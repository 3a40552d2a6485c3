import contextlib
import os
import signal
import subprocess
import sys

import pytest

# The suite runs on the CPU, on a machine with GPUs too (results there are not bit-exact, and
# the torchrun tests would need two): a test that needs a GPU asks for `gpu_environment`.
GPU_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything starts CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_cifar(tmp_path_factory):
    """A full-size CIFAR-10 binary data set of random images (read-only by convention)."""
    return write_dataset(str(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-bin"))


@pytest.fixture(scope="session")
def real_cifar():
    root = os.environ.get("CIFAR10_DIR")
    if not root or not os.path.isdir(root):
        pytest.skip("real CIFAR-10 not available: set CIFAR10_DIR to the cifar-10-batches-bin folder")
    return root


@pytest.fixture(scope="session")
def gpu_environment():
    """The environment of a subprocess that sees this machine's GPUs; skips without one."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if GPU_DEVICES is not None:
        env["CUDA_VISIBLE_DEVICES"] = GPU_DEVICES
    count = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           env=env, capture_output=True, text=True).stdout.strip()
    if count in ("", "0"):
        pytest.skip("no CUDA GPU on this machine")
    return env


@pytest.fixture
def restore_float32_settings():
    import run
    before = {name: s.fp32_precision for name, s in run.float32_settings().items()}
    yield
    for name, setting in run.float32_settings().items():
        setting.fp32_precision = before[name]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains in subprocesses, runs torchrun, a download "
                            "server or real-data evaluations; `-m 'not slow'` is the fast tier")


# Fixtures that train a run or need the real data or a GPU: a test that uses one is slow.
SLOW_FIXTURES = {"real_cifar", "gpu_environment", "finished_run", "reference", "stopped",
                 "matrix"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@contextlib.contextmanager
def no_hang(seconds=20):
    """Fail, instead of hanging the suite, if the block takes over `seconds` (an open() of a
    FIFO waits for a writer forever)."""
    def hung(signum, frame):  # not TimeoutError: an OSError, which a reader may catch
        raise RuntimeError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

