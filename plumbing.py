"""The file and machine plumbing under run.py: where a process stands among torchrun's, atomic
writes, which files are safe to open, the run folder's lock, the git commit and processor a run
was made with, and an upper bound on the memory a run needs, against what the machine has.
Torch-free."""
import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import signal
import stat
import subprocess
import sys
import time

from experiment import EVAL_BATCH


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands among those torchrun started; a lone process is rank 0 of 1."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_environment(cls):
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                   int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)))

    def batch_share(self, batch_size):
        """Images of each global batch that one process trains on."""
        return batch_size // self.size

    def batch_shard(self, batch_size):
        """This process's part of each global batch."""
        share = self.batch_share(batch_size)
        return slice(self.rank * share, (self.rank + 1) * share)


def exit_on_signals():
    """Until training installs its own handlers (which checkpoint before stopping): Ctrl-C or
    SIGTERM end the command with one line and exit 128 + the signal, even while torch loads,
    never with a traceback or the signal's silent death. Nothing is saved, and nothing is half
    written: every file is written atomically."""
    def stop(signum, frame):
        print(f"interrupted by {signal.Signals(signum).name}; no training was under way, "
              "nothing to save", file=sys.stderr)
        raise SystemExit(128 + signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


class RunError(Exception):
    """A failure the user can act on; run.py prints it as one line and exits 1."""


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def atomic_write(path, write):
    """Write via a temporary file in the same folder, fsync, then os.replace: a crash at any
    moment leaves either the old file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a write's error names no file
            raise OSError(e.errno, e.strerror, path) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


NOT_REGULAR = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
               stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}


# The largest run-folder files read: config.json, result.json, test.json; checkpoints (ResNet-1202's
# weights and momentum are 0.2 GB).
JSON_MAX_BYTES = 16 * 2 ** 20
CHECKPOINT_MAX_BYTES = 4 * 2 ** 30


def why_unreadable(path, max_bytes):
    """None if `path` is a regular file (or a link to one) of at most `max_bytes`, else why not,
    in one line that names it. It only stats the path, which never blocks: open() of a FIFO
    waits for a writer, a device like /dev/zero reads without end, a huge file fills memory."""
    try:
        info = os.stat(path)
    except OSError as e:
        return f"{path}: cannot read ({e.strerror or e})"
    if not stat.S_ISREG(info.st_mode):
        kind = next((kind for is_kind, kind in NOT_REGULAR.items() if is_kind(info.st_mode)),
                    "a special file")
        return f"{path}: {kind}, not a regular file"
    if info.st_size > max_bytes:
        return f"{path}: {info.st_size:,} bytes, more than the {max_bytes:,} allowed"
    return None


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name and the vector units that matter for float32/bf16, from Linux's
    /proc/cpuinfo; elsewhere what platform knows."""
    try:
        with open(cpuinfo, errors="replace") as f:
            info = {key.strip(): value.strip()
                    for key, value in (line.split(":", 1) for line in f if ":" in line)}
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    units = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                                     ("amx_bf16", "AMX-BF16")) if flag in flags]
    name = " ".join(info.get("model name", "").split()) or platform.machine()
    return f"{name} ({', '.join(units)})" if units else name


def usable_cores():
    """The cores this process may run on (its affinity), else all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain",
                                "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


@contextlib.contextmanager
def run_folder(logdir, name, fresh):
    """Create <logdir>/<name> and hold its lock for the whole run: a second process on the
    same folder is refused instead of interleaving checkpoints. The lock is on the folder
    itself, which tidying cannot delete; its .lock file only names the process holding it."""
    import fcntl  # here: POSIX only, and loading weights through torch.hub needs none of it
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise RunError(f"--logdir {logdir}: is a file, expected a folder")
    folder = os.path.join(logdir, name)
    try:
        os.makedirs(folder, exist_ok=True)
        lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise RunError(f"--logdir {logdir}: cannot create run folder {folder} ({e.strerror})") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunError(f"{folder}: in use by another process (pid {lock_holder(folder)}); "
                           "one run per folder") from None
        if fresh and set(os.listdir(folder)) - {".lock"}:
            replaced = os.path.join(logdir, ".replaced", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.makedirs(os.path.dirname(replaced), exist_ok=True)
            os.replace(folder, replaced)
            print(f"--fresh: moved the previous run to {replaced}")
            with run_folder(logdir, name, fresh=False) as new_folder:
                yield new_folder
            return
        with open(os.path.join(folder, ".lock"), "w") as f:
            f.write(str(os.getpid()))
        for name in os.listdir(folder):  # half-written by a process that died mid-write
            if ".tmp-" in name:
                os.remove(os.path.join(folder, name))
        yield folder
    finally:
        os.close(lock)


def lock_holder(folder):
    """The pid its .lock file names, as text; "?" if it names none."""
    try:
        with open(os.path.join(folder, ".lock")) as f:
            return f.read(32).strip() or "?"
    except OSError:
        return "?"


def locked_by_another(folder):
    """Whether a process holds `folder`'s run lock (run_folder); takes none and creates nothing."""
    import fcntl
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the shared lock we may have got
    return False


GiB = 2 ** 30
# What a training process holds besides its activations; CPU values measured (table below).
LOADED = 5 * GiB  # the whole process once the data set is loaded, at the peak of loading it:
# Python and torch (0.5 GiB), the data set, the record buffers and per_pixel_mean's float64
# chunks, which keep_freed_memory keeps in the heap: measured 1.5-2.3 GiB in most runs, but
# 3.80 GiB once (n=1, batch 64, the test suite in a clean clone, 2026-11-29): how much of that
# heap a run reuses varies, so 5 GiB (the table below was made with 3 GiB: add 2 GiB to its bounds)
DATASET = 60_000 * (3 * 32 * 32 + 8)  # uint8 images and int64 labels of train and test
# On a GPU: estimates from the CUDA and PyTorch documentation; measured on an H200 (README):
# peaks 1.51-1.84x below the bound.
CUDA_RUNTIME = 1 * GiB  # the CUDA context, the cuDNN and cuBLAS kernels it loads on first use
# (lazy loading) and cuBLAS's workspaces: some hundreds of MiB. The context exists already when
# mem_get_info reads the free memory, so part of this counts twice: margin.
CUDNN_WORKSPACE = 1 * GiB  # scratch of the convolution algorithms cudnn.benchmark tries
CUDA_EVAL_BATCH = EVAL_BATCH["cuda"]  # run.evaluate's batch on a GPU (inference: no maps kept)
BACKWARD = 8 * 16 * 32 * 32 * 4  # bytes per image: 8 float32 maps of the first stage


def activations_saved(n):
    """Values per image that autograd keeps for the backward of ResNet(n) or plain(n): the input,
    and for each of the 6n+1 3x3 convs its output (kept by BN) and the ReLU's output (kept by the
    ReLU and the next conv; a BN output dies at its ReLU, the shortcut sum keeps nothing), plus
    option B's two projection outputs (counted for every net: 8% or less). Counted with
    torch.autograd.graph.saved_tensors_hooks, in float32 and under bf16 autocast alike."""
    first, second, third = 16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8  # a map of each stage
    return 3 * 32 * 32 + 2 * ((1 + 2 * n) * first + 2 * n * (second + third)) + second + third


def training_memory_bound(n, batch_size, amp="none", device="cpu"):
    """An upper bound on the bytes that training ResNet(n) or plain(n) with `batch_size` images
    per process takes on `device`: on CPU the whole process, on CUDA its GPU memory.

        CPU:   LOADED + weights + batch_size * per_image
        CUDA:  CUDA_RUNTIME + CUDNN_WORKSPACE + DATASET + weights
                   + max(batch_size * per_image, CUDA_EVAL_BATCH * BACKWARD)
        per_image = 2 * activations_saved(n) * (2 bytes under --amp bf16, else 4) + BACKWARD
        weights = 16 bytes (weight, gradient, momentum, a copy) * 97,216 n (>= the parameters)

    Fitted to the table, at the backward's peak the heap holds 1.6 (float32) to 1.8 (bf16) times
    what autograd keeps, plus 0.2-0.3 MiB per image whatever n (the backward's gradients of the
    first stage, the augmented batch); the factor 2 and BACKWARD (0.5 MiB) cover it. On CPU the
    activations reuse some of what loading left free in the heap, how much varies from run to
    run (n=1, batch 2048: 3.42 and 3.90 GiB; a range below is two runs): the bound assumes they
    reuse none.

    Peak resident memory of run.py (`python tests/test_memory.py --data-dir DIR`: `run.py N train
    --iters 2 --batch-size B [--amp bf16] [--compile]` in a child process, its peak RSS from
    wait4; Python, torch, the 60,000 images, two steps and the test evaluation), in GiB, and the
    bound; Intel Xeon with AVX-512 BF16 and AMX, 2 cores, torch 2.14.1, 2026-11-29:

        peak/bound (GiB)   batch 32        128        512        2048            4096
        N=1  float32       1.52-1.98/3.06  2.21/3.22  2.21/3.87  3.42-3.90/6.49  6.21/9.97
        N=1  bf16          1.98/3.04       2.21/3.14  2.21/3.56  2.36/5.24       3.81/7.49
        N=3  float32       1.52/3.11       1.98/3.44  2.45/4.75  6.39/9.99
        N=3  bf16          1.98/3.07       1.98/3.25  2.21/4.00  3.93/7.00
        N=1  float32 --compile                                   3.09/6.49
        N=1  bf16 --compile           2.29/3.14
        N=3  bf16 --compile                                      3.64/7.00

    The bound is 1.37 to 2.23 times every peak measured. --compile's worker processes are not
    counted.
    """
    itemsize = 2 if amp == "bf16" else 4
    per_image = 2 * activations_saved(n) * itemsize + BACKWARD
    weights = 16 * 97_216 * n
    if getattr(device, "type", device) == "cuda":
        return (CUDA_RUNTIME + CUDNN_WORKSPACE + DATASET + weights
                + max(batch_size * per_image, CUDA_EVAL_BATCH * BACKWARD))
    return LOADED + weights + batch_size * per_image


def available_memory(device):
    if device.type == "cuda":
        import torch
        return torch.cuda.mem_get_info(device)[0]
    limits = []
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f
                       if line.startswith("MemAvailable:")]
    with contextlib.suppress(OSError, ValueError):  # a container's limit (cgroup v2)
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limits.append(int(f.read()) - int(g.read()))  # "max" (no limit) fails int()
    return min(limits, default=None)  # None: unknown, no check


def keep_freed_memory():
    """Let glibc's malloc reuse freed activation buffers instead of returning them to the OS
    and page-faulting them back in at every step (measured: ~8% faster CPU training)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: large buffers come from the heap
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: and stay there once freed
