"""The experiment of He et al. 2015, "Deep Residual Learning for Image Recognition", Section 4.2,
in one place: the paper's recipe and schedule, the nets of its Table 6 and Figure 6 with its
errors, the settings that define a run, the curves a run logs, and where the data lives.

run.py trains with these facts, plot_curves.py compares against them, reproduce.py and hubconf.py
enumerate the nets from them. This module imports no torch, so that the tables and the plan of
runs are made without it.
"""
import os

# The paper's recipe, Section 4.2 (and 3.4).
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
    bn_batch=64,                # "on two GPUs": BN of the time normalised each GPU's 64 images
)
PAPER_SCHEDULE = (PAPER["iters"], PAPER["milestones"])
WARMUP_MAX_ITERS = 2_000  # our cap: the paper's warm-up ends after about 400 iterations
WARMUP_WINDOW = 100  # iterations whose training error decides whether the warm-up ends
# run.py's defaults of the settings that are not the net or the schedule: the paper's recipe, and
# ours where it says nothing (no validation split, warm-up by depth, float32, CIFAR-10).
RECIPE = dict(lr=PAPER["lr"], batch_size=PAPER["batch_size"], weight_decay=PAPER["weight_decay"],
              momentum=PAPER["momentum"], warmup="auto", val_size=0, dataset="cifar10")

# Settings that define the experiment: a resume must not change them; runs that agree on all
# of them but the seed are seeds of one configuration.
EXPERIMENT_KEYS = ("n", "plain", "shortcut", "iters", "milestones", "lr", "batch_size",
                   "weight_decay", "momentum", "seed", "val_size", "warmup", "amp", "dataset",
                   "bn_batch")
CONFIG_KEYS = tuple(k for k in EXPERIMENT_KEYS if k != "seed")


def bn_batch_before(config):
    """The BN batch of a run begun before --bn-batch: each process normalised over its share of
    the batch (every published run is one process), all of them over the whole batch with
    --sync-bn. A config.json says how many processes started the run; a checkpoint's
    configuration does not, and reads as one process."""
    batch, start = config.get("batch_size"), config.get("start")
    processes = start.get("processes", 1) if isinstance(start, dict) else 1
    if config.get("sync_bn") is True or not (type(batch) is int and type(processes) is int
                                            and processes >= 1 and batch % processes == 0):
        return batch
    return batch // processes


# Experiment settings added since the first checkpoints, with the value every run had before (a
# function of its configuration): a checkpoint or config.json without one reads as that value
# (and keeps its digest), so that older runs still resume and their weights still test.
ADDED_KEYS = {"dataset": lambda config: "cifar10", "bn_batch": bn_batch_before}


def with_added_defaults(config):
    """An experiment configuration (a checkpoint's, config.json's) as of today: every key of
    ADDED_KEYS that it lacks at the value runs had before the key was added."""
    return {**config, **{k: before(config) for k, before in ADDED_KEYS.items() if k not in config}}


def without_added_defaults(config):
    if not isinstance(config, dict):
        return config
    return {k: v for k, v in config.items()
            if not (k in ADDED_KEYS and v == ADDED_KEYS[k](config))}


def depth_of(n):
    """Weighted layers of a net with n blocks per stage: the first conv, 6n convs, the fc."""
    return 6 * n + 2


def parameter_count(n, plain=False, shortcut="A", num_classes=10):
    """The parameters of resnet.ResNet(n, plain, shortcut, num_classes), without building it:
    the first conv and its BN; per block two 3x3 convs and their BNs (weight and bias), and with
    option B a 1x1 conv and BN where the dimensions grow; the fc."""
    count, channels = 3 * 16 * 9 + 2 * 16, 16
    for width in (16, 32, 64):
        for _ in range(n):
            count += 9 * channels * width + 9 * width * width + 2 * 2 * width
            if channels != width and not plain and shortcut == "B":
                count += channels * width + 2 * width
            channels = width
    return count + 64 * num_classes + num_classes


# Table 6's and Figure 6's nets, name: (N, plain), in the order reproduce.py runs them: those
# the paper's central claims rest on first (ResNet-56 against plain-56 and plain-20),
# ResNet-1202 last.
MATRIX = {"resnet56": (9, False), "plain56": (9, True), "plain20": (3, True),
          "resnet110": (18, False), "resnet32": (5, False), "resnet44": (7, False),
          "plain32": (5, True), "plain44": (7, True), "resnet20": (3, False),
          "resnet1202": (200, False)}
# Table 6 of the paper, residual nets by depth: best test error (%), and (mean, std) where it
# gives them (5 runs). It gives no error for the plain nets.
PAPER_ERROR = {20: (8.75, None), 32: (7.51, None), 44: (7.17, None), 56: (6.97, None),
               110: (6.43, (6.61, 0.16)), 1202: (7.93, None)}

# The curves run.py logs (TensorBoard tags); plot_curves.py and reproduce.py read them.
TRAIN_LOSS, TRAIN_ERROR = "train/loss", "train/error"
TEST_LOSS, TEST_ERROR = "test/loss", "test/error"
LR, SPEED, WARMUP_ENDED = "lr", "speed/images_per_second", "warmup/ended_at"

# Images per evaluation batch: a CPU is fastest with batches whose activations stay in its
# caches (measured); a GPU with large ones.
EVAL_BATCH = {"cpu": 128, "cuda": 1000}

# The classes of each data set (cifar_binary.DATASETS' num_classes, without torch).
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

# Where each data set's binary files are: the folder its variable names, else data/<folder>.
DATA_FOLDERS = {"cifar10": ("CIFAR10_DIR", "cifar-10-batches-bin"),
                "cifar100": ("CIFAR100_DIR", "cifar-100-binary")}


def default_data_dir(dataset):
    """$CIFAR10_DIR or $CIFAR100_DIR, else data/<the official archive's folder>."""
    env_var, folder = DATA_FOLDERS[dataset]
    return os.environ.get(env_var) or os.path.join("data", folder)
