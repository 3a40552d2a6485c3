"""Train and test the CIFAR-10 residual and plain nets of He et al. 2015, Section 4.2.

    python run.py 3 train            # ResNet-20 with the paper's recipe, in logs/resnet20/
    python run.py 3 test             # its test error, per-class errors and layer responses
    python run.py 9 train --plain    # plain-56
    python run.py 3 train --dataset cifar100   # the same net on CIFAR-100's 100 classes

N is the number of blocks per stage (depth 6N+2). Running the same command again resumes the run
from its checkpoint. Everything else is a flag; the defaults are the paper's.
"""
import sys

if __name__ == "__main__":  # a mistyped flag is reported before torch loads, which takes seconds
    import cli
    import plumbing
    cli.parse_args()
    plumbing.exit_on_signals()

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import signal
import textwrap
import threading
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cifar_binary
import cli
from cli import build_parser, default_bn_batch, default_milestones, default_name
from ddp import any_process, from_rank_0, ranks_agree, sync_batchnorm
from experiment import (EVAL_BATCH, EXPERIMENT_KEYS, LR, PAPER, RECIPE, SPEED, TRAIN_ERROR,
                        TRAIN_LOSS, WARMUP_ENDED, WARMUP_MAX_ITERS, WARMUP_WINDOW, bn_batch_before,
                        default_data_dir, depth_of, with_added_defaults, without_added_defaults)
from plumbing import (CHECKPOINT_MAX_BYTES, JSON_MAX_BYTES, RunError, World, atomic_write,
                      available_memory, cpu_model, git_commit, keep_freed_memory, lock_holder,
                      locked_by_another, run_folder, training_memory_bound, usable_cores,
                      why_unreadable, write_json)
from resnet import LayerResponses, ResNet, count_parameters

# The checkpoint's layout, in one place: each key and its type. model.pt keeps MODEL_KEYS;
# both also hold "digest", the sha256 of the rest (tensor_digest).
CHECKPOINT_FORMAT = 1
# The weights and the optimizer state are checked by loading them into the network (a
# checkpoint of another network "does not fit"), not here.
CHECKPOINT_TYPES = {
    "format": int, "model": object, "iteration": int, "per_pixel_mean": torch.Tensor,
    "config": dict, "optimizer": object, "warmup_end": (int, type(None)),
    "window": torch.Tensor, "train_seconds": (int, float), "log_every": int, "rng": dict,
    "window_seconds": (int, float), "warmup_window": torch.Tensor, "train_digest": str}
MODEL_KEYS = ("format", "model", "iteration", "per_pixel_mean", "config")
CHECKPOINT_KEYS = tuple(CHECKPOINT_TYPES)
# Absent from older checkpoints, which still load.
SINCE_LATER = ("log_every", "window_seconds", "warmup_window", "train_digest")


# ---------------------------------------------------------------- command line (cli.py)

def parse_args(argv=None):
    """cli.parse_args, with the device checked against this machine."""
    return cli.parse_args(argv, check_device)


def check_device(parser, name, world):
    """--device names a device this machine has; under torchrun, one GPU per process."""
    device = None
    if name != "auto":
        with contextlib.suppress(RuntimeError):
            device = torch.device(name)
        if device is None or device.type not in ("cpu", "cuda"):  # meta, mps...: not supported
            parser.error(f"--device: expected auto, cpu, cuda or cuda:K, got {name!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {name}: CUDA is not available on this machine")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            parser.error(f"--device {name}: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s), cuda:0 and up")
    uses_cuda = device.type == "cuda" if device else torch.cuda.is_available()
    if world.size > 1 and uses_cuda:
        if device is not None and device.index is not None:
            parser.error(f"--device {name}: under torchrun each process takes the GPU of its "
                         "local rank; pass --device cuda")
        if world.local_size > torch.cuda.device_count():
            parser.error(f"torchrun started {world.local_size} processes on this node, but it "
                         f"has {torch.cuda.device_count()} GPU(s): one process per GPU "
                         "(--nproc-per-node)")



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
    """Error (%), mean loss and per-class error (%) of `model` in eval mode on a whole split,
    one class per output of the network (10 for CIFAR-10, 100 for CIFAR-100).
    Under torchrun each process takes every world-size-th image and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    device = images.device
    batch_size = EVAL_BATCH[device.type]
    sharded = dist.is_initialized()
    mine = slice(dist.get_rank(), None, dist.get_world_size()) if sharded else slice(None)
    classes = None  # the network's outputs, known from its first batch
    # At least one batch, if empty: a process whose shard is empty (--val-size 1 under torchrun)
    # still learns the number of classes, and adds zeros to the others' sums.
    for start in range(0, max(1, len(images[mine])), batch_size):
        x = cifar_binary.normalize(images[mine][start:start + batch_size], mean)
        y = labels[mine][start:start + batch_size]
        with autocast(device, amp):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        if classes is None:  # the errors of each class, then the loss
            classes = logits.shape[1]
            sums = torch.zeros(classes + 1, dtype=torch.float64, device=device)
        sums[:classes] += torch.bincount(y[logits.argmax(1) != y], minlength=classes)
        sums[classes] += F.cross_entropy(logits, y, reduction="sum")
    if sharded:
        dist.all_reduce(sums)
    model.train(was_training)
    wrong, loss_sum = sums[:classes], sums[classes].item()
    per_class = torch.bincount(labels, minlength=classes).clamp_min(1)
    return {"error": 100.0 * wrong.sum().item() / len(images), "loss": loss_sum / len(images),
            "per_class_error": (100.0 * wrong / per_class).tolist()}


# ---------------------------------------------------------------- checkpoints

def tensor_digest(state):
    """sha256 of every value in a checkpoint, tensors byte for byte, in a fixed order: a byte
    damaged on disk inside a tensor (which torch.load does not notice) changes it. A setting of
    ADDED_KEYS at its default counts as absent, as in the checkpoints written before it."""
    digest = hashlib.sha256()

    def visit(value):
        if isinstance(value, torch.Tensor):
            digest.update(repr((value.dtype, tuple(value.shape))).encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        else:
            digest.update(repr(value).encode())
    visit({k: without_added_defaults(v) if k == "config" else v
           for k, v in state.items() if k != "digest"})
    return digest.hexdigest()


def on_cpu(value):
    """The checkpoint with every tensor on the CPU: it loads on a machine without a GPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def save_checkpoint(path, state, keys=CHECKPOINT_KEYS):
    """Write the `keys` of `state` (CHECKPOINT_KEYS, or MODEL_KEYS for model.pt) with their
    digest, atomically."""
    state = on_cpu({key: state[key] for key in keys})
    state["digest"] = tensor_digest(state)
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__  # torch wraps the file's OSError
        if not isinstance(cause, OSError):
            raise
        raise RunError(f"{path}: cannot write checkpoint ({cause.strerror or cause}); the previous "
                       "checkpoint is intact") from None


# What to do about a checkpoint refused: in training, and when testing.
TRAIN_REMEDY = "move it away, or pass --fresh to start the run over"
TEST_REMEDY = "pass --checkpoint a checkpoint.pt or model.pt of this project's runs"


def load_checkpoint(path, keys=MODEL_KEYS, remedy=TRAIN_REMEDY):
    """A checkpoint holding at least `keys`, each of its type, refused in one line otherwise
    (ending with `remedy`); its configuration with_added_defaults. Its digest is checked by
    `verify_digest` once its contents were found to fit."""
    if not os.path.lexists(path):
        raise RunError(f"{path}: no checkpoint there")
    problem = why_unreadable(path, CHECKPOINT_MAX_BYTES)  # a FIFO would block torch.load
    if problem:
        raise RunError(f"{problem}; {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: no checkpoint there") from None
    except Exception as e:  # torch raises many types for damaged or foreign files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RunError(f"{path}: not a readable checkpoint of this project ({reason}); "
                       f"{remedy}") from None
    if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT
            and all(isinstance(state[key], CHECKPOINT_TYPES[key]) if key in state
                    else key in SINCE_LATER for key in keys)
            and type(state["iteration"]) is int and state["iteration"] >= 0
            and set(EXPERIMENT_KEYS) <= with_added_defaults(state["config"]).keys()
            and with_added_defaults(state["config"])["dataset"] in cifar_binary.DATASETS
            and state["per_pixel_mean"].shape == (3, 32, 32)):
        raise RunError(f"{path}: not a checkpoint of this project (no format {CHECKPOINT_FORMAT} "
                       f"{'/'.join(keys[1:])}); {remedy}")
    state["config"] = with_added_defaults(state["config"])
    return state


def verify_digest(path, state, remedy=TRAIN_REMEDY):
    """Checkpoints written before digests were stored have none, and load as they are."""
    if "digest" in state and state["digest"] != tensor_digest(state):
        raise RunError(f"{path}: damaged (its contents do not match the digest stored with them); "
                       f"{remedy}")


@contextlib.contextmanager
def checkpoint_must_fit(path, config, remedy=TRAIN_REMEDY):
    """Turns a checkpoint whose contents do not fit its configuration into a RunError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunError(f"{path}: does not fit {describe(config)} ({reason}); {remedy}") from None


# ---------------------------------------------------------------- setup shared by train and test

def pick_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    return device


def float32_settings():
    """torch's settings of the internal precision of float32 convs and matmuls, by library."""
    b = torch.backends
    return {"cuDNN conv": b.cudnn.conv, "cuBLAS matmul": b.cuda.matmul,
            "oneDNN conv": b.mkldnn.conv, "oneDNN matmul": b.mkldnn.matmul}


def set_float32_precision(tf32):
    """float32 as IEEE float32 in every library (cuDNN convs default to TF32 on Ampere and
    newer GPUs), or TF32 on GPUs with --tf32. torch's API of 2.9 on; once it is used, the
    legacy getter torch.backends.cudnn.allow_tf32 raises, so nothing here reads it."""
    for library, setting in float32_settings().items():
        setting.fp32_precision = "tf32" if tf32 and not library.startswith("oneDNN") else "ieee"


def setup_machine(args, world=None):
    """The device, its arithmetic (float32 or TF32, deterministic or fastest kernels), CPU
    threads (all cores, shared between the processes of a node) and, under torchrun, the
    process group."""
    world = world or World.from_environment()
    device = pick_device(args.device, world.local_rank)
    torch.set_num_threads(args.threads or max(1, (usable_cores() or 1) // world.local_size))
    set_float32_precision(args.tf32)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.backends.cudnn.deterministic = True
        # warn_only: cross-entropy and the 8x8 average pool's backward have no kernel marked
        # deterministic on CUDA; for these shapes they use no atomics (checked by a GPU resume).
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world.size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
    return device


def check_memory(config, world, device):
    """Refuse, before loading anything, a run that would not fit in the memory available now:
    training_memory_bound is an upper bound (measured on CPU), so a run that passes does not
    grow into the out-of-memory killer unless other processes take the memory meanwhile."""
    batch = world.batch_share(config["batch_size"])
    needed = training_memory_bound(config["n"], batch, config["amp"], device)
    processes = world.local_size if device.type == "cpu" else 1  # a node's processes share it
    available = available_memory(device)
    if available is not None and processes * needed > available:
        amp = f" with --amp {config['amp']}" if config["amp"] != "none" else ""
        each = f" in each of {processes} processes" if processes > 1 else ""
        raise RunError(f"N={config['n']} (depth {depth_of(config['n'])}) needs up to "
                       f"{processes * needed / 2**30:.1f} GiB to train with batches of {batch}"
                       f"{each} on {device}{amp}, but {available / 2**30:.1f} GiB is available; "
                       "use a smaller --batch-size or N")


def fetch_data(args, world):
    """--download by one process while the others wait: rank 0, then the first process of any
    node that still lacks the data (nodes that share no file system)."""
    if not args.download:
        return
    for fetches in (world.rank == 0, world.local_rank == 0):
        if fetches:
            cifar_binary.download(args.data_dir, dataset=args.dataset)
        if world.size > 1:
            dist.barrier()


def load_data(args, split):
    return cifar_binary.load_split(args.data_dir, split, dataset=args.dataset)


@dataclasses.dataclass
class Splits:
    """The images (uint8, (N, 3, 32, 32)) and labels of training, validation and test, the
    per-pixel mean of the training images in use, and the sha256 of all training records."""
    train: tuple
    val: tuple
    test: tuple
    per_pixel_mean: torch.Tensor
    train_digest: str = None

    @classmethod
    def load(cls, args):
        images, labels = load_data(args, "train")
        digest = hashlib.sha256(images.numpy().tobytes())
        digest.update(labels.numpy().tobytes())
        train, val = cifar_binary.train_val_split(images, labels, args.val_size)
        return cls(train, val, load_data(args, "test"), cifar_binary.per_pixel_mean(train[0]),
                   digest.hexdigest())

    def to(self, device):
        on = lambda pair: tuple(t.to(device) for t in pair)
        return Splits(on(self.train), on(self.val), on(self.test), self.per_pixel_mean.to(device),
                      self.train_digest)


def build_model(config, device, batch_share=None):
    """The network on `device`; trained on `batch_share` images a step, its batch norm in
    training over groups of config["bn_batch"] of them (evaluation is the same either way)."""
    bn_batch = config["bn_batch"] if batch_share and config["bn_batch"] < batch_share else None
    model = ResNet(config["n"], plain=config["plain"], shortcut=config["shortcut"],
                   num_classes=cifar_binary.get_dataset(config["dataset"]).num_classes,
                   bn_batch=bn_batch)
    return model.to(device, memory_format=torch.channels_last)


def build_optimizer(model, config):
    return torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                           weight_decay=config["weight_decay"], foreach=True)


def experiment_config(args):
    return {key: getattr(args, key) for key in EXPERIMENT_KEYS}


def describe(config):
    net = f"{'plain' if config['plain'] else 'ResNet'}-{depth_of(config['n'])}"
    net = net if config["plain"] else f"{net} (option {config['shortcut']})"
    dataset = with_added_defaults(config)["dataset"]
    if dataset != "cifar10":
        net += f" on {cifar_binary.get_dataset(dataset).name}"
    return net


def result_fields(config, params, test_result):
    """The fields result.json and test.json share: the network and its test error."""
    return {"test_error": test_result["error"], "test_loss": test_result["loss"],
            "depth": depth_of(config["n"]), "params": params, "plain": config["plain"],
            "shortcut": config["shortcut"]}


# ---------------------------------------------------------------- opening a run

def open_run(args, config, world, stack):
    """Rank 0 takes the run folder (its lock held until `stack` closes) and decides for every
    process: a new run (None), a resume (the checkpoint), or nothing to do ("finished")."""
    folder = os.path.join(args.logdir, args.name)
    outcome = None
    if world.rank == 0:
        try:
            folder = stack.enter_context(run_folder(args.logdir, args.name, args.fresh))
            state = resumable_checkpoint(folder, config)
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
        if world.rank == 0:
            print(state)
        return folder, "finished"
    return folder, state


def resumable_checkpoint(folder, config):
    """The checkpoint to resume from (None for a new run), after checking it is this run's."""
    checkpoint_path = os.path.join(folder, "checkpoint.pt")
    if not os.path.exists(checkpoint_path):
        return None
    state = load_checkpoint(checkpoint_path, CHECKPOINT_KEYS)
    info = read_run_info(folder)  # the resume appends to it: refuse now if it cannot
    held = state["config"]
    if info is not None and "bn_batch" not in info and held["bn_batch"] == held["batch_size"]:
        # begun before --bn-batch (read as one process): config.json knows how many it had
        held = {**held, "bn_batch": bn_batch_before(
            {"batch_size": held["batch_size"], "start": info["start"],
             "sync_bn": info.get("sync_bn")})}
    changed = changed_settings(held, config)
    if changed:
        diff = describe_changes(changed)
        hint = (f"; to resume it, add --bn-batch {changed['bn_batch'][0]} --name "
                f"{os.path.basename(folder)}" if "bn_batch" in changed else "")
        raise RunError(f"{checkpoint_path}: belongs to another configuration ({diff}){hint}; "
                       "use another --name, or --fresh to start over")
    return state


def changed_settings(held, config):
    """{setting: (the run's value, the command's)} for each of `config` that the run's `held`
    configuration has otherwise."""
    return {k: (held.get(k), v) for k, v in config.items() if held.get(k) != v}


def describe_changes(changed):
    return ", ".join(f"{k}: run has {old}, command has {new}" for k, (old, new) in changed.items())


def read_run_info(folder):
    """The run folder's config.json (None if absent), with its list of resumes."""
    path = os.path.join(folder, "config.json")
    if not os.path.lexists(path):
        return None
    remedy = "move it away to resume (a new one is written)"
    problem = why_unreadable(path, JSON_MAX_BYTES)
    if problem:
        raise RunError(f"{problem}; {remedy}")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise RunError(f"{path}: unreadable ({e}); {remedy}") from None
    if not (isinstance(info, dict) and isinstance(info.get("start"), dict)
            and isinstance(info.get("resumes"), list)
            and all(isinstance(resume, dict) for resume in info["resumes"])):
        raise RunError(f"{path}: not written by run.py (no start and list of resumes); {remedy}")
    return info


def write_run_info(args, run, resumed):
    """config.json: every setting, and the machine and code of the start and of each resume."""
    info = {**run.config, "depth": depth_of(run.config["n"]), "params": run.params,
            "name": args.name, "data_dir": os.path.abspath(args.data_dir),
            "train_images": len(run.data.train[0]), "train_sha256": run.data.train_digest,
            "eval_every": args.eval_every,
            "ckpt_every": args.ckpt_every, "log_every": args.log_every,
            "compile": args.compile, "sync_bn": args.sync_bn}
    processor = (torch.cuda.get_device_name(run.device) if run.device.type == "cuda"
                 else cpu_model())
    machine = {"device": str(run.device), "processor": processor, "cores": usable_cores(),
               "processes": run.world.size,
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "git_commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "iteration": run.iteration, "tf32": args.tf32, "deterministic": args.deterministic}
    saved = read_run_info(run.folder) if resumed else None
    if saved is None:
        saved = {**info, "start": machine, "resumes": []}
    else:
        warn_of_another_device(run, (saved["resumes"] or [saved["start"]])[-1])
        saved["resumes"].append(machine)
    write_json(os.path.join(run.folder, "config.json"), saved)
    print(f"{describe(run.config)}: {run.params:,} parameters, {len(run.data.train[0]):,} "
          f"training images ({len(run.data.val[0]):,} held out), {run.world.size} x "
          f"{run.device}, {torch.get_num_threads()} threads")
    print(textwrap.fill("  ".join(f"{k}={v}" for k, v in info.items()
                                  if k not in ("depth", "params")), width=100,
                        break_long_words=False, break_on_hyphens=False))
    print(f"run folder: {run.folder}  (tensorboard --logdir={args.logdir})")


def warn_of_another_device(run, previous):
    """The augmentation's random stream and the arithmetic differ between CPUs and GPUs."""
    before = str(previous.get("device", "?")).split(":")[0]
    if before != run.device.type:
        print(f"warning: {run.folder} trained on {before} until iteration {run.iteration} and "
              f"resumes on {run.device.type}: the augmentation's random stream and the "
              "arithmetic change, so this run is no longer bit-reproducible", file=sys.stderr)


# ---------------------------------------------------------------- the state a run's phases share

class Window:
    """The running sums of one --log-every window (loss x images, errors, images), kept on the
    device and read once a window. Under torchrun each process holds its shards' part."""

    def __init__(self, device, batch_images, world):
        self.world = world
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.batch_images = torch.tensor(float(batch_images), dtype=torch.float64, device=device)

    def add(self, loss, wrong):
        self.sums += torch.stack([loss.double() * self.batch_images, wrong.double(),
                                  self.batch_images])

    def whole(self):
        """Every process's part summed: what a checkpoint saves, mid-window too."""
        sums = self.sums.clone()
        if self.world.size > 1:
            dist.all_reduce(sums)
        return sums

    def restore(self, saved):
        if self.world.rank == 0:  # the saved window holds every process's part: restore it once
            self.sums = saved.to(self.sums.device, torch.float64).reshape(3)

    def close(self, signalled):
        """(loss sum, errors, images, whether any process was signalled) over all processes,
        in one read of the device; the next window starts from zero."""
        flag = torch.tensor([float(signalled)], dtype=torch.float64, device=self.sums.device)
        totals = torch.cat([self.sums, flag])
        if self.world.size > 1:
            dist.all_reduce(totals)
        loss_sum, wrong, count, signalled = totals.tolist()
        self.sums.zero_()
        return loss_sum, wrong, count, signalled > 0


class Warmup:
    """The paper's warm-up (ResNet-110 and deeper by default): lr 0.01 until the training error
    of a window of WARMUP_WINDOW iterations is below 80% (whatever --log-every is)."""

    def __init__(self, config, ended_at):
        self.ended_at = ended_at
        self.on = uses_warmup(config) and ended_at is None

    def window_closed(self, iteration, train_error):
        """Whether the warm-up ends with this window."""
        if self.on and warmup_ends(iteration, train_error):
            self.on, self.ended_at = False, iteration
            return True
        return False


class TrainingClock:
    """Seconds spent training: evaluations and checkpoints run inside `paused()`. A lap is a
    --log-every window: one stopped mid-window resumes with the seconds it had run."""

    def __init__(self, seconds=0.0, lap_seconds=0.0):
        self.seconds, self.lap_seconds, self.since = seconds, lap_seconds, time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        self.lap_seconds += time.perf_counter() - self.since
        try:
            yield
        finally:
            self.since = time.perf_counter()

    def start(self):
        """Counting from now: setting the run up (data to the device, the event file) is not
        training."""
        self.since = time.perf_counter()

    def lap(self):
        """Training seconds since the previous lap."""
        now = time.perf_counter()
        lap, self.lap_seconds, self.since = self.lap_seconds + now - self.since, 0.0, now
        self.seconds += lap
        return lap


def duration(seconds):
    """e.g. 3h20m, 45m, 20s."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


# ---------------------------------------------------------------- the phases of a training run

class TrainingRun:
    """What a training run's phases share: the network, optimizer and data on the device,
    where the run stands (iteration, warm-up, window, clock) and where it writes."""

    def __init__(self, args, config, world, device, data, folder, state):
        self.args, self.config, self.world, self.device, self.folder, self.data = \
            args, config, world, device, folder, data
        self.lead = world.rank == 0  # the process that writes the run folder
        self.checkpoint_path = os.path.join(folder, "checkpoint.pt")
        torch.manual_seed(config["seed"])
        self.model = build_model(config, device, world.batch_share(config["batch_size"]))
        if args.sync_bn and world.size > 1:
            self.model = sync_batchnorm(self.model, device)
        self.params = count_parameters(self.model)
        self.optimizer = build_optimizer(self.model, config)
        self.window = Window(device, world.batch_share(config["batch_size"]), world)
        self.warmup_window = Window(device, world.batch_share(config["batch_size"]), world)
        self.iteration, self.signals, self.stopping = 0, [], False
        self.estimated, self.progress_printed_at = False, None
        self.clock, self.warmup = TrainingClock(), Warmup(config, None)
        if state is not None:
            with checkpoint_must_fit(self.checkpoint_path, config):
                self.restore(state)
            verify_digest(self.checkpoint_path, state)
            if self.lead:
                print(f"resuming from iteration {self.iteration}")
        if self.lead:
            write_run_info(args, self, resumed=state is not None)
        self.data = self.data.to(device)
        self.step_model = self.model
        if world.size > 1:
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None)
        if args.compile:
            self.step_model = torch.compile(self.step_model)
        self.order = BatchOrder(config["seed"], len(self.data.train[0]), config["batch_size"],
                                device)
        self.shard = world.batch_shard(config["batch_size"])
        self.augment_generator = torch.Generator(device=device)

    def restore(self, state):
        """Weights, momentum, position, window, RNG and per-pixel mean from a checkpoint."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for param, saved in self.optimizer.state.items():  # torch checks no shapes here
            buffer = saved.get("momentum_buffer")
            if buffer is not None and buffer.shape != param.shape:
                raise ValueError(f"momentum buffer of shape {tuple(buffer.shape)} for "
                                 f"a parameter of shape {tuple(param.shape)}")
        if state.get("train_digest", self.data.train_digest) != self.data.train_digest:
            raise RunError(f"{self.checkpoint_path}: the run trained on other data than "
                           f"{self.args.data_dir} holds (sha256 of the training records "
                           f"{state['train_digest'][:12]}..., now {self.data.train_digest[:12]}"
                           "...); point --data-dir at its data, or --fresh to start over")
        self.iteration = int(state["iteration"])
        self.warmup = Warmup(self.config, state["warmup_end"])
        self.clock = TrainingClock(float(state["train_seconds"]),
                                   float(state.get("window_seconds", 0.0)))
        self.window.restore(state["window"])
        if "warmup_window" in state:
            self.warmup_window.restore(state["warmup_window"])
        torch.set_rng_state(state["rng"]["torch"])
        self.data.per_pixel_mean = state["per_pixel_mean"]

    def __enter__(self):
        """Catch SIGINT/SIGTERM (the run stops cleanly), open the event file and progress bar."""
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, train only
        from tqdm import tqdm
        on_signal = lambda signum, frame: self.signals.append(signum)
        self.previous_handlers = {s: signal.signal(s, on_signal)
                                  for s in (signal.SIGINT, signal.SIGTERM)}
        self.previous_excepthook = threading.excepthook
        threading.excepthook = self.quiet_event_writer
        self.bar = tqdm(total=self.config["iters"], initial=self.iteration, dynamic_ncols=True,
                        smoothing=0.05, disable=None if self.lead else True)
        # A resumed writer hides what the previous process logged after its checkpoint; what it
        # logged at the checkpoint's own iteration (before saving) stays. Its file is its own
        # (the name holds the process id), and its flush() returns once every queued event is
        # in the file, which save() relies on.
        self.writer = None
        try:
            with self.event_file():
                self.writer = (SummaryWriter(self.folder, flush_secs=30, purge_step=(
                    self.iteration + 1 if self.iteration else None)) if self.lead else None)
        except RunError:
            self.__exit__(RunError, None, None)
            raise
        self.clock.start()
        return self

    def __exit__(self, exc_type, *exc):
        self.bar.close()
        for s, handler in self.previous_handlers.items():
            signal.signal(s, handler)
        try:
            if self.writer and exc_type is None:
                with self.event_file():
                    self.writer.close()
            elif self.writer:  # already failing: the writer may fail too
                with contextlib.suppress(OSError):
                    self.writer.close()
        finally:
            threading.excepthook = self.previous_excepthook

    @contextlib.contextmanager
    def event_file(self):
        """An error writing the event file (a full disk) as one line naming its folder."""
        try:
            yield
        except OSError as e:
            raise RunError(f"{self.folder}: cannot write its TensorBoard event file "
                           f"({e.strerror or e}); the last checkpoint is kept") from None

    def quiet_event_writer(self, hook_args):
        """TensorBoard's writer thread meets a write error first; the training thread meets
        the same error at its next write and reports it in one line: no traceback here."""
        if not issubclass(hook_args.exc_type, OSError):
            self.previous_excepthook(hook_args)

    def log(self, tag, value):
        if self.lead:
            with self.event_file():
                self.writer.add_scalar(tag, value, self.iteration)

    def say(self, message):
        """A line above the progress bar, from one process (tqdm.write ignores `disable`)."""
        if self.lead:
            self.bar.write(message)

    def step(self):
        """One SGD step on the iteration's batch, at the iteration's learning rate."""
        lr = lr_at(self.iteration, self.config["lr"], self.config["milestones"], self.warmup.on)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.order(self.iteration)
        self.augment_generator.manual_seed(
            derived_seed(self.config["seed"], "augment", self.iteration))
        images, labels = self.data.train
        loss, wrong = train_step(self.step_model, self.optimizer, images[batch], labels[batch],
                                 self.data.per_pixel_mean, self.augment_generator,
                                 self.config["amp"], self.shard)
        self.window.add(loss, wrong)
        self.iteration += 1
        self.bar.update(1)
        if self.warmup.on:
            self.warmup_window.add(loss, wrong)
            if self.iteration % WARMUP_WINDOW == 0:
                self.end_warmup_window()
        # A lone process stops after any step. CPU processes agree after every step: torchrun
        # kills them 30 s after a signal, and a CPU window may take longer. GPU processes agree
        # at the end of a window (seconds there), with no sync per step.
        if self.world.size == 1:
            self.stopping = bool(self.signals)
        elif self.device.type == "cpu":
            self.stopping = any_process(bool(self.signals))

    def end_window(self):
        """Log the window's training loss, error, lr and speed."""
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum, wrong, count, self.stopping = self.window.close(bool(self.signals))
        elapsed = self.clock.lap()
        if not math.isfinite(loss_sum):
            raise RunError(f"training loss is not finite in the window ending at iteration "
                           f"{self.iteration} (lr {lr:g}); the last good checkpoint "
                           f"{self.checkpoint_path} is kept")
        train_error, speed = 100.0 * wrong / count, count / elapsed if elapsed > 0 else 0.0
        for tag, value in ((TRAIN_LOSS, loss_sum / count), (TRAIN_ERROR, train_error),
                           (LR, lr), (SPEED, speed)):
            self.log(tag, value)
        self.bar.set_postfix(loss=f"{loss_sum / count:.3f}", err=f"{train_error:.1f}%",
                             lr=f"{lr:g}", ips=f"{speed:.0f}", refresh=False)
        self.report_progress(loss_sum / count, train_error, lr, speed)

    def end_warmup_window(self):
        """End the warm-up if the training error of its last window is below the paper's 80%."""
        _, wrong, count, _ = self.warmup_window.close(signalled=False)
        train_error = 100.0 * wrong / count
        if self.warmup.window_closed(self.iteration, train_error):
            self.log(WARMUP_ENDED, self.iteration)
            self.say(f"warm-up ended at iteration {self.iteration} "
                     f"(train error {train_error:.1f}%)")

    def report_progress(self, loss, train_error, lr, speed):
        """After the first window, the time training will take at its speed; where there is no
        progress bar (output to a file), a plain line at most once a minute."""
        left = (self.config["iters"] - self.iteration) * self.config["batch_size"] / speed \
            if speed else None
        if not self.estimated and left:
            self.say(f"about {duration(left)} of training left at {speed:,.0f} images/s "
                     "(evaluations and checkpoints add to it)")
            self.estimated = True
        now = time.monotonic()
        if self.lead and self.bar.disable and (self.progress_printed_at is None
                                               or now - self.progress_printed_at >= 60):
            print(f"iter {self.iteration:,}/{self.config['iters']:,}  loss {loss:.3f}  train "
                  f"error {train_error:.1f}%  lr {lr:g}  {speed:,.0f} img/s"
                  + (f"  {duration(left)} left" if left else ""), flush=True)
            self.progress_printed_at = now

    def evaluate(self):
        """Test (and validation) error and loss; the model in eval mode."""
        with self.clock.paused():
            if self.world.size > 1:  # rank 0's BN statistics, as saved, for every shard
                for buffer in self.model.buffers():
                    dist.broadcast(buffer, src=0)
            splits = {"test": self.data.test, "val": self.data.val}
            return {name: evaluate(self.model, *split, self.data.per_pixel_mean,
                                   self.config["amp"])
                    for name, split in splits.items() if len(split[0])}

    def log_evaluation(self, results):
        for name, result in results.items():
            self.log(f"{name}/error", result["error"])
            self.log(f"{name}/loss", result["loss"])

    def report_evaluation(self):
        results = self.evaluate()
        self.log_evaluation(results)
        self.say(f"iter {self.iteration}: test error {results['test']['error']:.2f}%"
                 + (f", val error {results['val']['error']:.2f}%" if "val" in results else "")
                 + f", epoch {self.order.epoch_of(self.iteration):.1f}")

    def model_state(self):
        """The checkpoint's MODEL_KEYS: what model.pt holds."""
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                "iteration": self.iteration, "per_pixel_mean": self.data.per_pixel_mean,
                "config": self.config}

    def state(self):
        """The checkpoint's contents (CHECKPOINT_KEYS), every process's window summed."""
        return {**self.model_state(), "optimizer": self.optimizer.state_dict(),
                "warmup_end": self.warmup.ended_at, "window": self.window.whole(),
                "train_seconds": self.clock.seconds, "log_every": self.args.log_every,
                "rng": {"torch": torch.get_rng_state()},
                "warmup_window": self.warmup_window.whole(),
                "train_digest": self.data.train_digest,
                "window_seconds": self.clock.lap_seconds}  # the clock is paused while saving

    def save(self):
        """checkpoint.pt, after checking the weights are finite and the same in every process."""
        with self.clock.paused():
            weights = [t for t in self.model.state_dict().values() if t.is_floating_point()]
            if not all(torch.isfinite(t).all() for t in weights):  # BN statistics included
                raise RunError(f"weights are not finite at iteration {self.iteration} (training "
                               f"diverged); the last good checkpoint {self.checkpoint_path} is kept")
            if self.world.size > 1 and not ranks_agree(self.model):
                raise RunError(f"the processes' weights differ at iteration {self.iteration}; "
                               "not saving them")
            state = self.state()
            if self.lead:
                with self.event_file():  # every curve point the checkpoint covers, in the file first
                    self.writer.flush()
                save_checkpoint(self.checkpoint_path, state)

    def stopped(self):
        """The exit code of a run stopped by a signal, its checkpoint written."""
        if self.lead:
            self.bar.write(f"stopped by a signal at iteration {self.iteration}; checkpoint "
                           "written, run the same command to resume", file=sys.stderr)
        return 128 + (self.signals[0] if self.signals else signal.SIGTERM)

    def finish(self):
        """The final evaluation (never a best one picked on the test set), then result.json and
        model.pt, the final weights to share. A signal during the evaluation stops the run
        before them and logs nothing (the rerun evaluates and logs it once); one during the writes
        lets them complete."""
        results = self.evaluate()
        if self.signals:
            return self.stopped()
        self.log_evaluation(results)
        if self.lead:
            self.write_results(results)
        if self.signals:
            if self.lead:
                self.bar.write(f"stopped by a signal after the run finished; {self.folder} "
                               "holds its results", file=sys.stderr)
            return 128 + self.signals[0]
        return 0

    def write_results(self, results):
        """result.json and model.pt."""
        seconds = self.clock.seconds
        result = {**result_fields(self.config, self.params, results["test"]),
                  **({"val_error": results["val"]["error"]} if "val" in results else {}),
                  "iterations": self.iteration, "seed": self.config["seed"],
                  "amp": self.config["amp"], "warmup_end": self.warmup.ended_at,
                  "train_seconds": round(seconds, 1),
                  "images_per_second": round(self.iteration * self.config["batch_size"]
                                             / seconds, 1) if seconds else None}
        save_checkpoint(os.path.join(self.folder, "model.pt"), self.model_state(), MODEL_KEYS)
        write_json(os.path.join(self.folder, "result.json"), result)
        print(f"{describe(self.config)} after {self.iteration} iterations: "
              f"test error {result['test_error']:.2f}%")


# ---------------------------------------------------------------- train

def train(args):
    world = World.from_environment()
    device = setup_machine(args, world)
    config = experiment_config(args)
    check_memory(config, world, device)
    fetch_data(args, world)
    data = Splits.load(args)
    with contextlib.ExitStack() as stack:
        # Open the run: a new one, a resume from its checkpoint, or nothing left to do.
        folder, state = open_run(args, config, world, stack)
        if state == "finished":
            return 0
        # Build the network and optimizer, restored from the checkpoint when resuming.
        run = stack.enter_context(TrainingRun(args, config, world, device, data, folder, state))
        # Train: a step per iteration; a window's statistics; an evaluation; a checkpoint.
        iters = config["iters"]
        while run.iteration < iters and not run.stopping:
            run.step()
            if run.iteration % args.log_every == 0 or run.iteration == iters:
                run.end_window()
            if run.iteration % args.eval_every == 0 and run.iteration < iters:
                run.report_evaluation()
            if run.iteration % args.ckpt_every == 0 or run.stopping or run.iteration == iters:
                run.save()
        # Finish: the final evaluation, result.json and model.pt; or a clean stop.
        return run.stopped() if run.stopping else run.finish()


# ---------------------------------------------------------------- test

def test(args):
    device = setup_machine(args, World())  # one process, even under torchrun
    path, state, model = weights_to_test(args, device)
    config, iteration = state["config"], state["iteration"]
    # Whether these are the run's final weights, and whether another process still trains it.
    folder = os.path.dirname(os.path.abspath(path))
    final, trainer = iteration >= config["iters"], training_process(folder)
    if trainer is not None or not final:
        print(f"note: {folder} is " + (f"being trained by another process (pid {trainer})"
                                       if trainer is not None else "unfinished")
              + f": testing its checkpoint of iteration {iteration:,} of {config['iters']:,}, "
              + ("the run's final weights" if final else "not the run's final weights"))
    fetch_data(args, World())
    images, labels = load_data(args, "test")
    images, labels = images.to(device), labels.to(device)
    with LayerResponses(model) as responses:
        result = evaluate(model, images, labels, state["per_pixel_mean"].to(device), config["amp"])
    classes = cifar_binary.get_dataset(config["dataset"]).classes
    test_report = {**result_fields(config, count_parameters(model), result),
                   "dataset": config["dataset"], "seed": config["seed"],
                   "per_class_error": dict(zip(classes, result["per_class_error"])),
                   "iteration": iteration, "iters": config["iters"], "final_weights": final,
                   "in_training": trainer is not None,
                   "checkpoint": path,  # as given: reproducible
                   "layer_responses": responses.std()}
    print_test_report(config, iteration, len(images), test_report)
    out = args.out or (os.path.join(folder, "test.json")
                       if os.path.exists(os.path.join(folder, "checkpoint.pt")) else None)
    if out is None:  # published or shared weights: their folder is not a run of this machine
        print(f"test.json not written: {folder} holds no checkpoint.pt of a run trained there "
              "(published or shared weights); --out FILE writes it")
        return 0
    write_json(out, test_report)
    print(f"wrote {out}")
    return 0


def weights_to_test(args, device):
    """(path, checkpoint, network with its weights): the checkpoint the command names, checked
    against the command's net and against its run folder's config.json."""
    path = checkpoint_to_test(args)
    state = load_checkpoint(path, remedy=TEST_REMEDY)
    config = state["config"]
    asked = {"n": args.n, "plain": args.plain, "shortcut": args.shortcut, "dataset": args.dataset}
    if any(config[k] != v for k, v in asked.items()):
        raise RunError(f"{path}: holds {describe(config)}, but the command asks for "
                       f"{describe(asked)}; pass the matching N/--plain/--shortcut/--dataset")
    folder_config = read_json_or_none(os.path.join(os.path.dirname(path), "config.json"))
    if isinstance(folder_config, dict):  # the settings it names (older ones name fewer)
        differ = [f"{k} {config[k]} (config.json: {folder_config[k]})" for k in EXPERIMENT_KEYS
                  if k in folder_config and config[k] != folder_config[k]]
        if differ:
            raise RunError(f"{path}: not the run of its folder's config.json: "
                           f"{', '.join(differ)}; {TEST_REMEDY}")
    model = build_model(config, device)
    with checkpoint_must_fit(path, config, TEST_REMEDY):
        model.load_state_dict(state["model"])
    verify_digest(path, state, TEST_REMEDY)
    if "digest" not in state:
        print(f"note: {path} carries no digest (written before digests were): whether its "
              "bytes are intact cannot be checked")
    return path, state, model


def print_test_report(config, iteration, images, test_report):
    print(f"{describe(config)}, iteration {iteration}: test error "
          f"{test_report['test_error']:.2f}% ({images:,} images)")
    per_class = list(test_report["per_class_error"].items())
    if len(per_class) > 10:  # CIFAR-100: the extremes; all of them are in test.json
        per_class = sorted(per_class, key=lambda item: item[1])
        per_class = per_class[:5] + [("...", None)] + per_class[-5:]
    for name, error in per_class:
        print(f"  {name:<10} {error:5.1f}%" if error is not None else f"  {name}")


def checkpoint_to_test(args):
    """The checkpoint `test` evaluates: --checkpoint (a file, or a run folder); else the run
    folder the flags name; else, when there is none and --name was not given, the only run
    folder under --logdir that matches the command (N, --plain, --shortcut, --dataset, and each
    other experiment setting it gives a value other than the default), saying which."""
    if args.checkpoint:
        if os.path.isdir(args.checkpoint):
            return checkpoint_in(args.checkpoint)
        return args.checkpoint
    folder = os.path.join(args.logdir, args.name)
    if os.path.isdir(folder) or args.name != default_name(args):
        return checkpoint_in(folder)
    asked = asked_settings(args)
    wanted = describe(asked) + "".join(f", {k} {v}" for k, v in asked.items()
                                       if k not in ("n", "plain", "shortcut", "dataset"))
    runs = [run for run in testable_runs(args.logdir)
            if all(run.config[k] == v for k, v in asked.items())]
    if len(runs) == 1:
        print(f"no run folder {folder}: testing {runs[0].folder}, the only run of {wanted} "
              f"under {args.logdir}")
        return runs[0].checkpoint
    if not runs:
        raise RunError(f"{folder}: no run there, nor any other run of {wanted} with a "
                       f"checkpoint under {args.logdir}; pass the run's --name, or --checkpoint")
    raise RunError("\n".join([f"{len(runs)} runs of {wanted} under {args.logdir}; pass the "
                              "--name of the one to test:"] + [f"  {run}" for run in runs]))


def checkpoint_in(folder):
    """A run folder's checkpoint.pt: its latest weights, while it trains, and its final ones
    (the same as model.pt's) once it finished; model.pt in a folder without one (a published
    or shared run)."""
    checkpoint = os.path.join(folder, "checkpoint.pt")
    model = os.path.join(folder, "model.pt")
    return model if os.path.exists(model) and not os.path.exists(checkpoint) else checkpoint


def asked_settings(args):
    """The experiment settings a command gives: N, --plain, --shortcut and --dataset, and every
    other one that differs from its default."""
    defaults = vars(build_parser().parse_args([str(args.n), args.mode]))
    defaults["milestones"] = default_milestones(args.iters)
    defaults["bn_batch"] = default_bn_batch(args, World.from_environment())
    return {k: getattr(args, k) for k in EXPERIMENT_KEYS
            if k in ("n", "plain", "shortcut", "dataset") or getattr(args, k) != defaults[k]}


@dataclasses.dataclass
class RunFolder:
    """A run folder with a checkpoint to test, as a line that says where the run stands."""
    folder: str
    config: dict
    checkpoint: str

    def __str__(self):
        result = read_json_or_none(os.path.join(self.folder, "result.json")) or {}
        if isinstance(result.get("test_error"), (int, float)) and \
                isinstance(result.get("iterations"), int):
            return (f"{self.folder}: finished, {result['iterations']:,} iterations, test error "
                    f"{result['test_error']:.2f}%")
        try:
            where = f"iteration {load_checkpoint(self.checkpoint)['iteration']:,}"
        except RunError:
            where = "unreadable checkpoint"
        trainer = training_process(self.folder)
        return (f"{self.folder}: {where} of {self.config['iters']:,}"
                + (f", in training (pid {trainer})" if trainer is not None else ", unfinished"))


def testable_runs(logdir):
    """The run folders under `logdir` with a checkpoint, each with its experiment settings
    (config.json's, else the checkpoint's), in name order; dot-folders (.replaced/) are not runs."""
    runs = []
    names = sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []
    for name in names:
        folder = os.path.join(logdir, name)
        checkpoint = checkpoint_in(folder)
        if name.startswith(".") or not os.path.isfile(checkpoint):
            continue
        config = with_added_defaults(read_json_or_none(os.path.join(folder, "config.json")) or {})
        if not set(EXPERIMENT_KEYS) <= config.keys():
            try:
                config = load_checkpoint(checkpoint)["config"]
            except RunError:
                continue  # not a run of this project: nothing to test there
        runs.append(RunFolder(folder, config, checkpoint))
    return runs


def read_json_or_none(path):
    """A JSON object from a run folder's file; None if it is absent, unsafe or not one."""
    if why_unreadable(path, JSON_MAX_BYTES):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def training_process(folder):
    """The pid (a string; "?" if unknown) of the process that trains in `folder`, which holds
    the folder's lock (plumbing.run_folder), or None."""
    return lock_holder(folder) if locked_by_another(folder) else None


def main(argv=None):
    args = parse_args(argv)
    for note in notes(args):
        print(note)
    try:
        return train(args) if args.mode == "train" else test(args)
    except (RunError, cifar_binary.DataError, OSError, torch.OutOfMemoryError) as e:
        # OSError: a file we write; OutOfMemoryError: a GPU another process filled meanwhile
        if isinstance(e, torch.OutOfMemoryError):
            e = (f"out of GPU memory with N={args.n} and batches of {args.batch_size} "
                 f"({str(e).strip().splitlines()[0][:160]}); use a smaller --batch-size or N, "
                 "or free the GPU")
        if isinstance(e, OSError) and e.filename:  # a file we write: name it
            e = f"{e.filename}: {e.strerror or e}"
        world = World.from_environment()  # errors may differ by process: each says its own
        print(f"error: {f'[rank {world.rank}] ' if world.size > 1 else ''}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started: nothing to save
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def notes(args):
    """One line each about a command that works but may not do what was meant."""
    depth = cli.depth_note(args.n)
    cores = usable_cores()
    threads = None
    if args.threads and cores and args.threads > cores:
        threads = (f"note: --threads {args.threads} is more than the {cores} cores this process "
                   "may use: the threads take turns on them, which slows training and evaluation")
    return [line for line in (depth, threads) if line]


if __name__ == "__main__":
    code = main()
    if World.from_environment().size > 1:
        # Under torchrun, gloo's worker threads may still free a finished collective's tensor
        # while the interpreter shuts down, which aborts the process (pytorch/pytorch#190489).
        # Every file is closed and the process group destroyed by now: leave without that.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)
