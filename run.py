"""Train and test the CIFAR-10 residual and plain nets of He et al. 2015, Section 4.2.

    python run.py 3 train            # ResNet-20 with the paper's recipe, in logs/resnet20/
    python run.py 3 test             # its test error, per-class errors and layer responses
    python run.py 9 train --plain    # plain-56

N is the number of blocks per stage (depth 6N+2). Running the same command again resumes the run
from its checkpoint. Everything else is a flag; the defaults are the paper's.
"""
import argparse
import contextlib
import ctypes
import datetime
import fcntl
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cifar_binary
from ddp import World, from_rank_0, ranks_agree, sync_batchnorm
from resnet import LayerResponses, ResNet, count_parameters

# The paper's recipe, Section 4.2 (and 3.4), in one place.
PAPER = dict(
    lr=0.1,                     # "We start with a learning rate of 0.1,
    milestones=(32_000, 48_000),  # divide it by 10 at 32k and 48k iterations,
    iters=64_000,               # and terminate training at 64k iterations"
    batch_size=128,             # "mini-batch size of 128"
    weight_decay=1e-4,          # "weight decay of 0.0001
    momentum=0.9,               # and momentum of 0.9"
    warmup_lr=0.01,             # ResNet-110: "use 0.01 to warm up the training
    warmup_until_error=80.0,    # until the training error is below 80% (about 400 iterations)"
    warmup_min_n=18,            # warm-up by default from ResNet-110 (n=18) on
)
WARMUP_MAX_ITERS = 2_000  # our cap: the paper's warm-up ends after about 400 iterations
CHECKPOINT_FORMAT = 1
# Settings that define the experiment: a resume must not change them.
EXPERIMENT_KEYS = ("n", "plain", "shortcut", "iters", "milestones", "lr", "batch_size",
                   "weight_decay", "momentum", "seed", "val_size", "warmup", "amp")


class RunError(Exception):
    """A failure the user can act on; main() prints it as one line and exits 1."""


# ---------------------------------------------------------------- command line

def number_type(kind, lowest, inclusive=True):
    """An argparse type: a finite `kind` (int or float) >= lowest (or > lowest)."""
    noun = "whole number" if kind is int else "finite number"
    bound = f"{'>=' if inclusive else '>'} {lowest:g}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {noun}, got {text!r}") from None
        if not math.isfinite(value) or value < lowest or (value == lowest and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a {noun} {bound}, got {text}")
        return value
    return parse


non_negative_int = number_type(int, 0)
positive_int = number_type(int, 1)
non_negative_float = number_type(float, 0.0)
positive_float = number_type(float, 0.0, inclusive=False)


def build_parser():
    p = argparse.ArgumentParser(
        description="Train or test the CIFAR-10 ResNets and plain nets of He et al. 2015 (Sec. 4.2).")
    p.add_argument("n", type=positive_int, metavar="N", help="blocks per stage; depth is 6N+2 "
                   "(3: 20 layers, 5: 32, 7: 44, 9: 56, 18: 110, 200: 1202)")
    p.add_argument("mode", choices=("train", "test"))
    net = p.add_argument_group("network")
    net.add_argument("--plain", action="store_true", help="no shortcuts (the paper's plain nets)")
    net.add_argument("--shortcut", choices=("A", "B"), default="A",
                     help="A: zero-padding identity (paper's CIFAR choice); B: projection")
    rec = p.add_argument_group("recipe (defaults are the paper's)")
    rec.add_argument("--iters", type=positive_int, default=PAPER["iters"])
    rec.add_argument("--milestones", type=positive_int, nargs="+", default=None,
                     help="iterations at which the lr is divided by 10 (default: 32000 48000, "
                          "or 1/2 and 3/4 of --iters when --iters is given)")
    rec.add_argument("--lr", type=positive_float, default=PAPER["lr"])
    rec.add_argument("--batch-size", type=positive_int, default=PAPER["batch_size"])
    rec.add_argument("--weight-decay", type=non_negative_float, default=PAPER["weight_decay"])
    rec.add_argument("--momentum", type=non_negative_float, default=PAPER["momentum"])
    rec.add_argument("--warmup", choices=("auto", "on", "off"), default="auto",
                     help=f"lr {PAPER['warmup_lr']} until training error < "
                          f"{PAPER['warmup_until_error']:.0f}%%; auto: for N >= {PAPER['warmup_min_n']}")
    rec.add_argument("--seed", type=non_negative_int, default=0)
    rec.add_argument("--val-size", type=non_negative_int, default=0,
                     help="hold out the last K training images (paper's analysis: 5000)")
    rec.add_argument("--amp", choices=("none", "bf16"), default="none",
                     help="bf16 autocast with float32 weights and BN statistics")
    data = p.add_argument_group("data and run folder")
    data.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR") or
                      os.path.join("data", "cifar-10-batches-bin"),
                      help="folder of the binary batches (default: $CIFAR10_DIR, else %(default)s)")
    data.add_argument("--download", action="store_true", help="fetch the official archive first")
    data.add_argument("--logdir", default="logs")
    data.add_argument("--name", default=None, help="run folder name (default: from the config)")
    data.add_argument("--fresh", action="store_true",
                      help="start over; an existing run folder is moved to <logdir>/.replaced/")
    data.add_argument("--checkpoint", default=None, help="test: evaluate this checkpoint file")
    ops = p.add_argument_group("monitoring and machine")
    ops.add_argument("--eval-every", type=positive_int, default=1000,
                     help="evaluate on the test set every K iterations")
    ops.add_argument("--ckpt-every", type=positive_int, default=1000)
    ops.add_argument("--log-every", type=positive_int, default=100,
                     help="window of the running train error/loss, in iterations")
    ops.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1")
    ops.add_argument("--threads", type=positive_int, default=None,
                     help="CPU threads (default: all cores)")
    ops.add_argument("--compile", action="store_true", help="torch.compile the model")
    ops.add_argument("--sync-bn", action="store_true",
                     help="under torchrun: BN statistics over the global batch, not per process")
    ops.add_argument("--dist-timeout", type=positive_int, default=600,
                     help="under torchrun: seconds a process waits for the others before failing")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.milestones is None:
        args.milestones = default_milestones(args.iters)
    if any(b <= a for a, b in zip(args.milestones, args.milestones[1:])):
        parser.error(f"--milestones must be strictly increasing, got {args.milestones}")
    if args.milestones and args.milestones[-1] >= args.iters:
        parser.error(f"--milestones must be below --iters {args.iters}, got {args.milestones}")
    if args.plain and args.shortcut != "A":
        parser.error("--shortcut: a plain net (--plain) has no shortcuts to choose")
    if args.momentum >= 1:  # heavy-ball SGD diverges from momentum 1 on
        parser.error(f"--momentum must be below 1, got {args.momentum:g}")
    if args.seed >= 2 ** 64:  # torch.manual_seed's range
        parser.error(f"--seed must be below 2**64, got {args.seed}")
    if args.val_size >= 50_000:
        parser.error(f"--val-size must leave training images (below 50000), got {args.val_size}")
    if args.name is not None and (not args.name or os.sep in args.name or args.name.startswith(".")):
        parser.error(f"--name must be a plain folder name, got {args.name!r}")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):  # meta, mps...: not supported
            parser.error(f"--device: expected auto, cpu, cuda or cuda:K, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s), cuda:0 and up")
    world = World.from_environment()
    if args.batch_size % world.size:
        parser.error(f"--batch-size {args.batch_size} (the global batch) must divide evenly "
                     f"among the {world.size} processes")
    args.name = args.name or default_name(args)
    return args


def default_name(args):
    """e.g. resnet56, plain20, resnet20-B, resnet110-seed3: every departure from the paper's
    recipe shows in the name, so different configurations never share a folder."""
    parts = [f"{'plain' if args.plain else 'resnet'}{6 * args.n + 2}"]
    if args.shortcut != "A" and not args.plain:
        parts.append(args.shortcut)
    if args.amp != "none":
        parts.append(args.amp)
    if args.iters != PAPER["iters"]:
        parts.append(f"iters{args.iters}")
    if args.milestones != default_milestones(args.iters):
        parts.append("ms" + "-".join(map(str, args.milestones)))
    for key, label in (("lr", "lr"), ("batch_size", "bs"), ("weight_decay", "wd"),
                       ("momentum", "mom")):
        if getattr(args, key) != PAPER[key]:
            parts.append(f"{label}{getattr(args, key):g}")
    if args.warmup != "auto":
        parts.append(f"warmup-{args.warmup}")
    if args.val_size:
        parts.append(f"val{args.val_size}")
    if args.seed:
        parts.append(f"seed{args.seed}")
    return "-".join(parts)


def default_milestones(iters):
    """The paper's 32k/48k, or the same fractions (1/2, 3/4) of a shorter or longer schedule."""
    if iters == PAPER["iters"]:
        return list(PAPER["milestones"])
    return sorted({iters // 2, iters * 3 // 4} - {0})  # a tiny schedule may have fewer


# ---------------------------------------------------------------- schedule and data order

def uses_warmup(config):
    return config["warmup"] == "on" or (config["warmup"] == "auto"
                                        and config["n"] >= PAPER["warmup_min_n"])


def lr_at(iteration, base_lr, milestones, warming_up=False):
    """The learning rate of iteration `iteration` (0-based): /10 at each milestone reached."""
    if warming_up:
        return PAPER["warmup_lr"]
    return base_lr * 0.1 ** sum(iteration >= m for m in milestones)


def warmup_ends(iteration, train_error):
    """The paper's rule (train error below 80%), or our cap if training never gets there."""
    return train_error < PAPER["warmup_until_error"] or iteration >= WARMUP_MAX_ITERS


def derived_seed(*keys):
    """A 63-bit seed from the run's seed and a purpose, stable across processes and machines."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


class BatchOrder:
    """Training-set indices of every batch: epochs are fresh permutations drawn from
    (seed, epoch), concatenated into one stream that batches cut without dropping any image.
    A pure function of (seed, iteration), so a resumed run sees the same batches."""

    def __init__(self, seed, size, batch_size, device):
        self.seed, self.size, self.batch_size, self.device = seed, size, batch_size, device
        self.epoch, self.permutation = None, None

    def _permutation(self, epoch):
        if epoch != self.epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "order", epoch))
            self.epoch = epoch
            self.permutation = torch.randperm(self.size, generator=generator).to(self.device)
        return self.permutation

    def __call__(self, iteration):
        start = iteration * self.batch_size
        first_epoch, last_epoch = divmod(start, self.size)[0], (start + self.batch_size - 1) // self.size
        pieces = []
        for epoch in range(first_epoch, last_epoch + 1):
            lo = max(start - epoch * self.size, 0)
            hi = min(start + self.batch_size - epoch * self.size, self.size)
            pieces.append(self._permutation(epoch)[lo:hi])
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def epoch_of(self, iteration):
        return iteration * self.batch_size / self.size


# ---------------------------------------------------------------- one step, and evaluation

def train_step(model, optimizer, images, labels, mean, generator, amp, shard=slice(None)):
    """One SGD step on a uint8 batch (B, 3, 32, 32): augment, subtract the mean, forward,
    backward, update. Under torchrun every process augments the whole global batch alike and
    trains on its `shard` of it, so the images seen do not depend on the number of processes.
    Returns the shard's mean loss and its number of errors, as device tensors: reading them
    would wait for the device, so the caller does it once a window."""
    x = cifar_binary.normalize(cifar_binary.augment(images, generator)[shard], mean)
    labels = labels[shard]
    with autocast(images.device, amp):
        logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) != labels).sum()


def autocast(device, amp):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


@torch.inference_mode()
def evaluate(model, images, labels, mean, amp):
    """Error (%), mean loss and per-class error (%) of `model` in eval mode on a whole split.
    Under torchrun each process takes every world-size-th image and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    device = images.device
    # Measured: a CPU evaluates fastest with batches whose activations stay in its caches.
    batch_size = 128 if device.type == "cpu" else 1000
    sharded = dist.is_initialized()
    mine = slice(dist.get_rank(), None, dist.get_world_size()) if sharded else slice(None)
    sums = torch.zeros(11, dtype=torch.float64, device=device)  # errors per class, loss
    for start in range(0, len(images[mine]), batch_size):
        x = cifar_binary.normalize(images[mine][start:start + batch_size], mean)
        y = labels[mine][start:start + batch_size]
        with autocast(device, amp):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        sums[:10] += torch.bincount(y[logits.argmax(1) != y], minlength=10)
        sums[10] += F.cross_entropy(logits, y, reduction="sum")
    if sharded:
        dist.all_reduce(sums)
    model.train(was_training)
    wrong, loss_sum = sums[:10], sums[10].item()
    per_class = torch.bincount(labels, minlength=10).clamp_min(1)
    return {"error": 100.0 * wrong.sum().item() / len(images), "loss": loss_sum / len(images),
            "per_class_error": (100.0 * wrong / per_class).tolist()}


# ---------------------------------------------------------------- files

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
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def save_checkpoint(path, state):
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__  # torch wraps the file's OSError
        if not isinstance(cause, OSError):
            raise
        raise RunError(f"{path}: cannot write checkpoint ({cause.strerror or cause}); the previous "
                       "checkpoint is intact") from None


def load_checkpoint(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: no checkpoint there") from None
    except Exception as e:  # torch raises many types for damaged or foreign files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RunError(f"{path}: not a readable checkpoint of this project ({reason}); move it "
                       "away, or pass --fresh to start the run over") from None
    if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT
            and {"model", "config", "iteration", "per_pixel_mean"} <= state.keys()
            and isinstance(state["config"], dict) and set(EXPERIMENT_KEYS) <= state["config"].keys()
            and type(state["iteration"]) is int and state["iteration"] >= 0
            and isinstance(state["per_pixel_mean"], torch.Tensor)
            and state["per_pixel_mean"].shape == (3, 32, 32)):
        raise RunError(f"{path}: not a checkpoint of this project (no format {CHECKPOINT_FORMAT} "
                       "model/config/iteration/per-pixel mean); pass --fresh to start the run over")
    return state


@contextlib.contextmanager
def checkpoint_must_fit(path, config):
    """Turns a checkpoint whose contents do not fit its configuration into a RunError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunError(f"{path}: does not fit {describe(config)} ({reason}); move it away, or "
                       "pass --fresh to start the run over") from None


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
    same folder is refused instead of interleaving checkpoints."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise RunError(f"--logdir {logdir}: is a file, expected a folder")
    folder = os.path.join(logdir, name)
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+")
    except OSError as e:
        raise RunError(f"--logdir {logdir}: cannot create run folder {folder} ({e.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise RunError(f"{folder}: in use by another process (pid {lock.read().strip() or '?'}); "
                           "one run per folder") from None
        if fresh and len(os.listdir(folder)) > 1:
            replaced = os.path.join(logdir, ".replaced", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.makedirs(os.path.dirname(replaced), exist_ok=True)
            os.replace(folder, replaced)
            print(f"--fresh: moved the previous run to {replaced}")
            with run_folder(logdir, name, fresh=False) as new_folder:
                yield new_folder
            return
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        for name in os.listdir(folder):  # half-written by a process that died mid-write
            if ".tmp-" in name:
                os.remove(os.path.join(folder, name))
        yield folder


# ---------------------------------------------------------------- setup shared by train and test

def pick_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    return device


def setup_machine(args, world=None):
    """The device, CPU threads (all cores, shared between the processes of a node) and, under
    torchrun, the process group."""
    world = world or World.from_environment()
    device = pick_device(args.device, world.local_rank)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world.local_size))
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world.size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
    return device


def training_memory(n, batch_size):
    """A lower bound on the bytes training needs: per image, the two float32 maps autograd keeps
    for each of the 6n 3x3 layers (conv output, ReLU output), plus weights, gradients, momentum."""
    maps_per_block = 2 * 2 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8)  # per block and stage
    weights = 2 * 9 * (16 * 16 + 32 * 32 + 64 * 64) * n
    return 4 * (batch_size * n * maps_per_block + 3 * weights)


def available_memory(device):
    if device.type == "cuda":
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


def load_data(args, split):
    if args.download:
        cifar_binary.download(args.data_dir)
    return cifar_binary.load_split(args.data_dir, split)


def build_model(config, device):
    model = ResNet(config["n"], plain=config["plain"], shortcut=config["shortcut"])
    return model.to(device, memory_format=torch.channels_last)


def build_optimizer(model, config):
    return torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                           weight_decay=config["weight_decay"], foreach=True)


def experiment_config(args):
    return {key: getattr(args, key) for key in EXPERIMENT_KEYS}


def describe(config):
    net = f"{'plain' if config['plain'] else 'ResNet'}-{6 * config['n'] + 2}"
    return net if config["plain"] else f"{net} (option {config['shortcut']})"


# ---------------------------------------------------------------- train

def open_run(folder, config, log_every):
    """The checkpoint to resume from (None for a new run), after checking it is this run's."""
    checkpoint_path = os.path.join(folder, "checkpoint.pt")
    if not os.path.exists(checkpoint_path):
        return None
    state = load_checkpoint(checkpoint_path)
    changed = {k: (state["config"].get(k), v) for k, v in config.items()
               if state["config"].get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: run has {old}, command has {new}"
                         for k, (old, new) in changed.items())
        raise RunError(f"{checkpoint_path}: belongs to another configuration ({diff}); "
                       "use another --name, or --fresh to start over")
    warmup_window = state.get("log_every", log_every)
    if uses_warmup(config) and state.get("warmup_end") is None and warmup_window != log_every:
        raise RunError(f"{checkpoint_path}: its warm-up is still on and ends on the training "
                       f"error of --log-every windows of {warmup_window} iterations; resume "
                       f"with --log-every {warmup_window}")
    read_run_info(folder)  # the resume appends to it: refuse now if it cannot
    return state


def read_run_info(folder):
    """The run folder's config.json (None if absent), with its list of resumes."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({e}); move it away to resume (a new one is "
                       "written)") from None
    if not (isinstance(info, dict) and isinstance(info.get("resumes"), list)):
        raise RunError(f"{path}: not written by run.py (no list of resumes); move it away to "
                       "resume (a new one is written)")
    return info


def train(args):
    world = World.from_environment()
    device = setup_machine(args, world)
    config = experiment_config(args)
    lead = world.rank == 0  # the process that writes the run folder
    needed = training_memory(config["n"], config["batch_size"] // world.size)
    available = available_memory(device)
    if available is not None and needed > available:
        raise RunError(f"N={config['n']} (depth {6 * config['n'] + 2}) needs at least "
                       f"{needed / 2**30:.1f} GiB to train with batches of "
                       f"{config['batch_size'] // world.size} on {device}, but {available / 2**30:.1f} "
                       "GiB is available; use a smaller N, or more processes")
    images, labels = load_data(args, "train")
    test_images, test_labels = load_data(args, "test")
    (images, labels), (val_images, val_labels) = cifar_binary.train_val_split(
        images, labels, args.val_size)
    mean = cifar_binary.per_pixel_mean(images)  # of the training images in use

    with contextlib.ExitStack() as stack:
        folder = os.path.join(args.logdir, args.name)
        checkpoint_path = os.path.join(folder, "checkpoint.pt")
        outcome = None
        if lead:
            try:
                folder = stack.enter_context(run_folder(args.logdir, args.name, args.fresh))
                state = open_run(folder, config, args.log_every)
                outcome = ("resume", state)
                if state is not None and state["iteration"] >= config["iters"] and \
                        os.path.exists(os.path.join(folder, "result.json")):
                    outcome = ("finished", f"{folder}: already finished ({state['iteration']} "
                                           "iterations); --fresh starts it over")
            except RunError as e:
                outcome = ("error", str(e))
        kind, state = from_rank_0(world, outcome)
        if kind == "error":
            raise RunError(state)
        if kind == "finished":
            if lead:
                print(state)
            return 0

        torch.manual_seed(config["seed"])
        model = build_model(config, device)
        if args.sync_bn and world.size > 1:
            model = sync_batchnorm(model, device)
        params = count_parameters(model)
        optimizer = build_optimizer(model, config)
        iteration, warmup_end, train_seconds = 0, None, 0.0
        window = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, wrong, images
        if state is not None:
            with checkpoint_must_fit(checkpoint_path, config):
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                for param, saved in optimizer.state.items():  # torch checks no shapes here
                    buffer = saved.get("momentum_buffer")
                    if buffer is not None and buffer.shape != param.shape:
                        raise ValueError(f"momentum buffer of shape {tuple(buffer.shape)} for "
                                         f"a parameter of shape {tuple(param.shape)}")
                iteration, warmup_end = int(state["iteration"]), state["warmup_end"]
                train_seconds, mean = float(state["train_seconds"]), state["per_pixel_mean"]
                if lead:  # the saved window holds every process's part: restore it once
                    window = state["window"].to(device, torch.float64).reshape(3)
                torch.set_rng_state(state["rng"]["torch"])
            if lead:
                print(f"resuming from iteration {iteration}")

        run_info = {**config, "depth": 6 * config["n"] + 2, "params": params,
                    "name": args.name, "data_dir": os.path.abspath(args.data_dir),
                    "train_images": len(images), "eval_every": args.eval_every,
                    "ckpt_every": args.ckpt_every, "log_every": args.log_every,
                    "compile": args.compile, "sync_bn": args.sync_bn}
        machine = {"device": str(device), "processes": world.size,
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "git_commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "iteration": iteration}
        if lead:
            saved = read_run_info(folder) if state is not None else None
            if saved is None:
                saved = {**run_info, "start": machine, "resumes": []}
            else:
                saved["resumes"].append(machine)
            write_json(os.path.join(folder, "config.json"), saved)
            print(f"{describe(config)}: {params:,} parameters, {len(images):,} training images "
                  f"({len(val_images):,} held out), {world.size} x {device}, "
                  f"{torch.get_num_threads()} threads")
            print(textwrap.fill("  ".join(f"{k}={v}" for k, v in run_info.items()
                                          if k not in ("depth", "params")), width=100,
                                break_long_words=False, break_on_hyphens=False))
            print(f"run folder: {folder}  (tensorboard --logdir={args.logdir})")

        images, labels = images.to(device), labels.to(device)
        test_images, test_labels = test_images.to(device), test_labels.to(device)
        val_images, val_labels = val_images.to(device), val_labels.to(device)
        mean = mean.to(device)
        step_model = model
        if world.size > 1:
            step_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None)
        if args.compile:
            step_model = torch.compile(step_model)
        order = BatchOrder(config["seed"], len(images), config["batch_size"], device)
        per_rank = config["batch_size"] // world.size
        shard = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
        batch_count = torch.tensor(float(per_rank), dtype=torch.float64, device=device)
        augment_generator = torch.Generator(device=device)
        warming_up = uses_warmup(config) and warmup_end is None

        def checkpoint():
            weights = [t for t in model.state_dict().values() if t.is_floating_point()]
            if not all(torch.isfinite(t).all() for t in weights):  # BN statistics included
                raise RunError(f"weights are not finite at iteration {iteration} (training "
                               f"diverged); the last good checkpoint {checkpoint_path} is kept")
            if world.size > 1 and not ranks_agree(model):
                raise RunError(f"the processes' weights differ at iteration {iteration}; "
                               "not saving them")
            whole_window = window.clone()  # mid-window, each process holds its shards' part
            if world.size > 1:
                dist.all_reduce(whole_window)
            if lead:
                save_checkpoint(checkpoint_path, {
                    "format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "iteration": iteration,
                    "per_pixel_mean": mean.cpu(), "config": config, "warmup_end": warmup_end,
                    "window": whole_window.cpu(), "train_seconds": train_seconds,
                    "log_every": args.log_every, "rng": {"torch": torch.get_rng_state()}})

        def run_evaluation():
            if world.size > 1:  # rank 0's BN statistics, as saved, for every shard
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)
            results = {"test": evaluate(model, test_images, test_labels, mean, config["amp"])}
            if len(val_images):
                results["val"] = evaluate(model, val_images, val_labels, mean, config["amp"])
            for split, r in results.items():
                log(f"{split}/error", r["error"])
                log(f"{split}/loss", r["loss"])
            return results

        def log(tag, value):
            if lead:
                writer.add_scalar(tag, value, iteration)

        signals = []
        def on_signal(signum, frame):
            signals.append(signum)
        previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

        from tensorboardX import SummaryWriter  # imported late: slow, and only train needs it
        from tqdm import tqdm
        # A resumed writer hides what the previous process logged after its checkpoint; what it
        # logged at the checkpoint's own iteration (before saving) stays.
        writer = (SummaryWriter(folder, purge_step=iteration + 1 if iteration else None,
                                flush_secs=30) if lead else None)
        bar = tqdm(total=config["iters"], initial=iteration, dynamic_ncols=True, smoothing=0.05,
                   disable=None if lead else True)
        window_start = time.perf_counter()
        stopping = False
        try:
            while iteration < config["iters"] and not stopping:
                lr = lr_at(iteration, config["lr"], config["milestones"], warming_up)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = order(iteration)
                augment_generator.manual_seed(derived_seed(config["seed"], "augment", iteration))
                loss, wrong = train_step(step_model, optimizer, images[batch], labels[batch], mean,
                                         augment_generator, config["amp"], shard)
                window += torch.stack([loss.double() * batch_count, wrong.double(), batch_count])
                iteration += 1
                bar.update(1)
                # A lone process stops after any step; processes stop together after a window.
                stopping = bool(signals) and world.size == 1

                if iteration % args.log_every == 0 or iteration == config["iters"]:
                    totals = torch.cat([window, torch.tensor([float(bool(signals))], device=device,
                                                             dtype=torch.float64)])
                    if world.size > 1:
                        dist.all_reduce(totals)
                    loss_sum, wrong, count, signalled = totals.tolist()  # one sync a window
                    stopping = signalled > 0
                    elapsed = time.perf_counter() - window_start
                    train_seconds += elapsed
                    if not math.isfinite(loss_sum):
                        raise RunError(f"training loss is not finite in the window ending at "
                                       f"iteration {iteration} (lr {lr:g}); the last good checkpoint "
                                       f"{checkpoint_path} is kept")
                    train_error = 100.0 * wrong / count
                    speed = count / elapsed if elapsed > 0 else 0.0
                    log("train/loss", loss_sum / count)
                    log("train/error", train_error)
                    log("lr", lr)
                    log("speed/images_per_second", speed)
                    bar.set_postfix(loss=f"{loss_sum / count:.3f}", err=f"{train_error:.1f}%",
                                    lr=f"{lr:g}", ips=f"{speed:.0f}", refresh=False)
                    window.zero_()
                    if warming_up and warmup_ends(iteration, train_error):
                        warming_up, warmup_end = False, iteration
                        log("warmup/ended_at", iteration)
                        bar.write(f"warm-up ended at iteration {iteration} "
                                  f"(train error {train_error:.1f}%)")
                    window_start = time.perf_counter()
                if iteration % args.eval_every == 0 and iteration < config["iters"]:
                    results = run_evaluation()
                    bar.write(f"iter {iteration}: test error {results['test']['error']:.2f}%"
                              + (f", val error {results['val']['error']:.2f}%" if "val" in results
                                 else "") + f", epoch {order.epoch_of(iteration):.1f}")
                    window_start = time.perf_counter()
                if iteration % args.ckpt_every == 0 or stopping or iteration == config["iters"]:
                    checkpoint()
                    window_start = time.perf_counter()
        finally:
            bar.close()
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
        if stopping:
            if lead:
                writer.close()
                print(f"stopped by a signal at iteration {iteration}; checkpoint written, "
                      "run the same command to resume", file=sys.stderr)
            return 128 + (signals[0] if signals else signal.SIGTERM)

        results = run_evaluation()
        if lead:
            writer.close()
            result = {"test_error": results["test"]["error"],
                      "test_loss": results["test"]["loss"],
                      **({"val_error": results["val"]["error"]} if "val" in results else {}),
                      "iterations": iteration, "depth": 6 * config["n"] + 2, "params": params,
                      "plain": config["plain"], "shortcut": config["shortcut"],
                      "seed": config["seed"], "amp": config["amp"], "warmup_end": warmup_end,
                      "train_seconds": round(train_seconds, 1),
                      "images_per_second": round(iteration * config["batch_size"] / train_seconds,
                                                 1) if train_seconds else None}
            save_checkpoint(os.path.join(folder, "model.pt"), {  # the final weights, to share
                "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "iteration": iteration,
                "per_pixel_mean": mean.cpu(), "config": config})
            write_json(os.path.join(folder, "result.json"), result)
            print(f"{describe(config)} after {iteration} iterations: "
                  f"test error {result['test_error']:.2f}%")
    return 0


# ---------------------------------------------------------------- test

def test(args):
    device = setup_machine(args, World())  # one process, even under torchrun
    path = args.checkpoint or os.path.join(args.logdir, args.name, "checkpoint.pt")
    state = load_checkpoint(path)
    config = state["config"]
    asked = {"n": args.n, "plain": args.plain, "shortcut": args.shortcut}
    if any(config[k] != v for k, v in asked.items()):
        raise RunError(f"{path}: holds {describe(config)}, but the command asks for "
                       f"{describe(asked)}; pass the matching N/--plain/--shortcut")
    model = build_model(config, device)
    with checkpoint_must_fit(path, config):
        model.load_state_dict(state["model"])
    images, labels = load_data(args, "test")
    images, labels = images.to(device), labels.to(device)
    with LayerResponses(model) as responses:
        result = evaluate(model, images, labels, state["per_pixel_mean"].to(device), config["amp"])
    report = {"test_error": result["error"], "test_loss": result["loss"],
              "per_class_error": dict(zip(cifar_binary.CLASSES, result["per_class_error"])),
              "iteration": state["iteration"], "params": count_parameters(model),
              "depth": 6 * config["n"] + 2, "plain": config["plain"],
              "shortcut": config["shortcut"], "checkpoint": path,  # as given: reproducible
              "layer_responses": responses.std()}
    print(f"{describe(config)}, iteration {state['iteration']}: test error "
          f"{result['error']:.2f}% ({len(images):,} images)")
    for name, error in report["per_class_error"].items():
        print(f"  {name:<10} {error:5.1f}%")
    out = os.path.join(os.path.dirname(os.path.abspath(path)), "test.json")
    write_json(out, report)
    print(f"wrote {out}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args) if args.mode == "train" else test(args)
    except (RunError, cifar_binary.DataError, OSError) as e:  # OSError: a file we write
        if World.from_environment().rank == 0:  # the other processes have the same message
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started: nothing to save
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
