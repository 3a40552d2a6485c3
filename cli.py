"""run.py's command line: its flags, their checks, and the run folder's default name.

Torch-free, so that a mistyped flag is reported before torch loads (which takes seconds).
"""
import argparse
import math
import os

from experiment import DATA_FOLDERS, MATRIX, PAPER, RECIPE, default_data_dir, depth_of
from plumbing import World

MAX_THREADS = 65_536  # more than any machine has; torch refuses more than 2**31 - 1
MAX_DIST_TIMEOUT = 30 * 24 * 3600  # seconds: a month; Python's timedelta overflows far above


def number_type(kind, lowest, inclusive=True, highest=None):
    """An argparse type: a finite `kind` (int or float) >= lowest (or > lowest), and at most
    `highest` if given."""
    noun = "whole number" if kind is int else "finite number"
    bound = f"{'>=' if inclusive else '>'} {lowest:g}"
    bound += f" and at most {highest:,}" if highest is not None else ""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {noun}, got {text!r}") from None
        if not math.isfinite(value) or value < lowest or (value == lowest and not inclusive) \
                or (highest is not None and value > highest):
            raise argparse.ArgumentTypeError(f"expected a {noun} {bound}, got {text}")
        return value
    return parse


non_negative_int = number_type(int, 0)
positive_int = number_type(int, 1)
non_negative_float = number_type(float, 0.0)
positive_float = number_type(float, 0.0, inclusive=False)


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, unless its help already says it."""

    def _get_help_string(self, action):
        return action.help if "default" in action.help else super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        description="Train or test the CIFAR-10 ResNets and plain nets of He et al. 2015 (Sec. 4.2).",
        formatter_class=HelpWithDefaults)
    p.add_argument("n", type=positive_int, metavar="N", help="blocks per stage; depth is 6N+2 "
                   "(3: 20 layers, 5: 32, 7: 44, 9: 56, 18: 110, 200: 1202)")
    p.add_argument("mode", choices=("train", "test"),
                   help="train: train with the recipe below in <logdir>/<name>, resuming its "
                        "checkpoint if there is one; test: evaluate a run's checkpoint on the "
                        "test set (error, per-class errors, layer responses) into test.json; "
                        "without <logdir>/<name>, the only run under --logdir of the network "
                        "and settings given")
    net = p.add_argument_group("network")
    net.add_argument("--plain", action="store_true", help="no shortcuts (the paper's plain nets)")
    net.add_argument("--shortcut", choices=("A", "B"), default="A",
                     help="A: zero-padding identity (paper's CIFAR choice); B: projection")
    rec = p.add_argument_group("recipe (defaults are the paper's)")
    rec.add_argument("--iters", type=positive_int, default=PAPER["iters"],
                     help="training iterations (SGD steps)")
    rec.add_argument("--milestones", type=positive_int, nargs="+", default=None,
                     help="iterations at which the lr is divided by 10 (default: 32000 48000, "
                          "or 1/2 and 3/4 of --iters when --iters is given)")
    rec.add_argument("--lr", type=positive_float, default=RECIPE["lr"], help="initial learning rate")
    rec.add_argument("--batch-size", type=positive_int, default=RECIPE["batch_size"],
                     help="global batch (split among processes under torchrun)")
    rec.add_argument("--weight-decay", type=non_negative_float, default=RECIPE["weight_decay"],
                     help="L2 weight decay, on every parameter")
    rec.add_argument("--momentum", type=non_negative_float, default=RECIPE["momentum"],
                     help="SGD momentum")
    rec.add_argument("--warmup", choices=("auto", "on", "off"), default=RECIPE["warmup"],
                     help=f"lr {PAPER['warmup_lr']} until training error < "
                          f"{PAPER['warmup_until_error']:.0f}%%; auto: for N >= {PAPER['warmup_min_n']}")
    rec.add_argument("--seed", type=non_negative_int, default=0,
                     help="initial weights, batch order and augmentation")
    rec.add_argument("--val-size", type=non_negative_int, default=RECIPE["val_size"],
                     help="hold out the last K training images (paper's analysis: 5000)")
    rec.add_argument("--bn-batch", type=positive_int, default=None, metavar="K",
                     help="batch norm statistics over each group of K consecutive images of a "
                          "process's share of the batch, as each of the paper's 2 GPUs "
                          f"normalised its own {PAPER['bn_batch']} (default: {PAPER['bn_batch']}, "
                          "or the whole share where that does not divide it; with --sync-bn: "
                          "the global batch)")
    rec.add_argument("--amp", choices=("none", "bf16"), default="none",
                     help="bf16 autocast with float32 weights and BN statistics")
    data = p.add_argument_group("data and run folder")
    data.add_argument("--dataset", choices=tuple(DATA_FOLDERS),
                      default=RECIPE["dataset"],
                      help="cifar100: train and test on CIFAR-100's 100 fine labels")
    data.add_argument("--data-dir", default=None,
                      help="folder of the binary files (default: $CIFAR10_DIR, else "
                           "data/cifar-10-batches-bin; with --dataset cifar100: $CIFAR100_DIR, "
                           f"else data/cifar-100-binary; here: {default_data_dir('cifar10')} "
                           f"and {default_data_dir('cifar100')})")
    data.add_argument("--download", action="store_true", help="fetch the official archive first")
    data.add_argument("--logdir", default="logs", help="folder of the run folders")
    data.add_argument("--name", default=None,
                      help="run folder name (default: from the settings that differ from the "
                           "paper's, e.g. resnet56-bf16)")
    data.add_argument("--fresh", action="store_true",
                      help="start over; an existing run folder is moved to <logdir>/.replaced/")
    data.add_argument("--out", default=None, metavar="FILE",
                      help="test: where test.json goes (default: the run folder's test.json; "
                           "none for a folder of published or shared weights, which holds no "
                           "checkpoint.pt)")
    data.add_argument("--checkpoint", default=None,
                      help="test: evaluate this checkpoint file, or this run folder's "
                           "checkpoint.pt (model.pt if it has none) (default: the run folder's)")
    ops = p.add_argument_group("monitoring and machine")
    ops.add_argument("--eval-every", type=positive_int, default=1000,
                     help="evaluate on the test set every K iterations")
    ops.add_argument("--ckpt-every", type=positive_int, default=1000,
                     help="write checkpoint.pt every K iterations")
    ops.add_argument("--log-every", type=positive_int, default=100,
                     help="window of the running train error/loss, in iterations")
    ops.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1")
    ops.add_argument("--threads", type=number_type(int, 1, highest=MAX_THREADS), default=None,
                     help="CPU threads (default: all the cores this process may use, shared "
                          "among a node's processes)")
    ops.add_argument("--compile", action="store_true", help="torch.compile the model")
    ops.add_argument("--tf32", action="store_true",
                     help="let float32 convs and matmuls use TF32 on GPUs that have it (Ampere "
                          "on): faster, but not the paper's float32 arithmetic")
    ops.add_argument("--deterministic", action="store_true",
                     help="deterministic GPU kernels, so that a seeded GPU run and its resume are "
                          "bit-reproducible (CPU runs always are)")
    ops.add_argument("--sync-bn", action="store_true",
                     help="BN statistics over the whole global batch (folder -bn<batch>), not "
                          "over each --bn-batch images; under torchrun, across the processes")
    ops.add_argument("--dist-timeout", type=number_type(int, 1, highest=MAX_DIST_TIMEOUT),
                     default=600,
                     help="under torchrun: seconds a process waits for the others before failing")
    return p


def parse_args(argv=None, check_device=None):
    """The command line, checked: a usage error exits 2 with argparse's one line. The device
    is checked by `check_device(parser, name, world)` (run.py's, which needs torch)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or default_data_dir(args.dataset)
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
    if 50_000 - args.val_size < args.batch_size:
        parser.error(f"--val-size {args.val_size} leaves {max(50_000 - args.val_size, 0)} "
                     f"training images, fewer than one batch (--batch-size {args.batch_size})")
    if args.name is not None and (not args.name or os.sep in args.name or args.name.startswith(".")):
        parser.error(f"--name must be a plain folder name, got {args.name!r}")
    for flag, value in (("--name", args.name), ("--logdir", args.logdir)):
        if value is not None and not encodable(value):  # the event files' paths are UTF-8
            parser.error(f"{flag} must be valid UTF-8 text, got {value!r}")
    if args.sync_bn and args.compile:
        parser.error("--sync-bn with --compile is not supported yet (SyncBatchNorm is likely "
                     "to break the compiled graph, and it was not measured on a GPU); drop one")
    world = World.from_environment()
    if check_device is not None:
        check_device(parser, args.device, world)
    if args.batch_size % world.size:
        parser.error(f"--batch-size {args.batch_size} (the global batch) must divide evenly "
                     f"among the {world.size} processes")
    check_bn_batch(parser, args, world)
    args.name = args.name or default_name(args)
    return args


def default_bn_batch(args, world):
    """Batch norm over each group of the paper's 64 images, as on its two GPUs; over a process's
    whole share where 64 does not divide it; --sync-bn: over the whole global batch."""
    if args.sync_bn:
        return args.batch_size
    share = world.batch_share(args.batch_size)
    return PAPER["bn_batch"] if share % PAPER["bn_batch"] == 0 else share


def check_bn_batch(parser, args, world):
    """--bn-batch K divides each process's share of the batch; with --sync-bn it is the global
    batch. Sets the default."""
    default = default_bn_batch(args, world)
    if args.bn_batch is None:
        args.bn_batch = default
    elif args.sync_bn and args.bn_batch != args.batch_size:
        parser.error(f"--bn-batch {args.bn_batch} contradicts --sync-bn, which normalises over "
                     f"the global batch of {args.batch_size}; drop one")
    elif world.batch_share(args.batch_size) % args.bn_batch:
        share = world.batch_share(args.batch_size)
        over = f" ({args.batch_size} over {world.size} processes)" if world.size > 1 else ""
        parser.error(f"--bn-batch {args.bn_batch} must divide each process's share of the batch, "
                     f"{share} images{over}")


def default_name(args):
    """e.g. resnet56, plain20, resnet20-B, resnet110-seed3: every departure from the paper's
    recipe shows in the name, so different configurations never share a folder."""
    parts = [f"{'plain' if args.plain else 'resnet'}{depth_of(args.n)}"]
    if args.shortcut != "A" and not args.plain:
        parts.append(args.shortcut)
    if args.dataset != RECIPE["dataset"]:  # the paper's
        parts.append(args.dataset)
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
    if args.warmup != RECIPE["warmup"]:
        parts.append(f"warmup-{args.warmup}")
    if args.bn_batch != PAPER["bn_batch"]:  # not its default's: that depends on the processes
        parts.append(f"bn{args.bn_batch}")
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




def encodable(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, as Python decodes them from argv
        return False
    return True


def depth_note(n):
    """A line for an N that builds none of the paper's depths, since users often type the depth:
    N=56 builds ResNet-338; N=9 is ResNet-56. None for the paper's N."""
    paper = sorted({n for n, _ in MATRIX.values()})
    if n in paper:
        return None
    note = (f"note: N={n} builds a net of depth {depth_of(n)} (6N+2), none of the paper's "
            f"({', '.join(f'N={k}: {depth_of(k)}' for k in paper)})")
    if n in map(depth_of, paper):
        note += f"; N={(n - 2) // 6} builds depth {n}"
    return note
