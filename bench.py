"""Training and evaluation speed of the Section 4.2 ResNets (He et al. 2015) on the device at
hand: run.py's own pipeline against a reference written the way the popular reproductions do it.

    python bench.py                                  # ResNet-20 and -56, fp32 and bf16
    python bench.py --depths 20 --precisions fp32 --compile --windows 3

Ours is run.py's code path, called, not copied: the data set as one uint8 tensor on the device,
`cifar_binary.augment`/`normalize` on whole batches, `run.BatchOrder`, `run.train_step` on the
channels_last model of `run.build_model` with foreach SGD, bf16 through `--amp bf16`, and
`run.evaluate` (its batches, experiment.EVAL_BATCH; the uncompiled model, as train() uses it).
The reference, in the same process and on the same images: a torchvision-style Dataset that makes a
PIL image per item, RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor and Normalize per
image, a DataLoader (batch 128, shuffled, `--workers` processes), the same ResNet in NCHW float32,
torch.optim.SGD (momentum 0.9, weight decay 1e-4, its default implementation), and an evaluation
loop over a DataLoader of batch 128 (worker start-up timed: each evaluation pays it).

Training speed is images/s after `--warmup` discarded steps, the median of `--windows` windows of
`--steps` steps, each window closed by a device synchronisation before the clock is read;
evaluation is excluded. Evaluation speed is one timed pass over `--eval-images` test images,
after a warm-up pass. Printed: the machine, torch version and date, one markdown table, the time
to load the 60,000 images, the augmentation's share of a training step, and the FLOPs per image.

The table also times each step's convolutions alone (forward, backward to weights and inputs, as
PyTorch calls oneDNN or cuDNN, in the row's precision and memory format, on fixed tensors) and
divides the reference's step time by it: the "convs-alone bound" is the speed-up a pipeline would
have if batch norm, ReLU, shortcuts, loss, optimizer and data took no time at all (`+compile`
rows: the same eager convolutions). These fixed-tensor timings (and the augmentation's) are
torch.utils.benchmark.Timer's, on the run's CPU threads.

Train GFLOP/s divide the FLOPs of a training step, forward and backward, as
torch.utils.flop_counter.FlopCounterMode counts them (2 per multiply-accumulate of the convs and
the fc layer), by the step's time. fp32 means IEEE float32 on every device: TF32, on by default
for cuDNN's convolutions, is switched off.
"""
import argparse
import collections
import itertools
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

import cifar_binary
import cli
import run
from experiment import DATA_FOLDERS, EVAL_BATCH, default_data_dir
from plumbing import cpu_model
from resnet import ResNet

BATCH = 128  # the paper's, and both pipelines'
# CIFAR-10's channel statistics as the popular repos hard-code them; the values cost nothing.
CHANNEL_MEAN, CHANNEL_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
AMP = {"fp32": "none", "bf16": "bf16"}  # --precisions name -> run.py --amp
CONV_TIMING_SECONDS = 2.0  # Timer.blocked_autorange's min_run_time for each row's convs alone

Data = collections.namedtuple(
    "Data", "images labels test_images test_labels mean source load_seconds")
Pipeline = collections.namedtuple("Pipeline", "step evaluate close")
Row = collections.namedtuple(
    "Row", "depth pipeline train_ips step_seconds speedup gflops conv_seconds eval_ips")


def depth_type(text):
    depth = cli.positive_int(text)
    if depth < 8 or (depth - 2) % 6:
        raise argparse.ArgumentTypeError(f"expected a depth 6n+2 >= 8 (20, 32, 44, 56, 110), "
                                         f"got {depth}")
    return depth


def build_parser():
    p = argparse.ArgumentParser(description="Training/evaluation throughput of run.py against a "
                                "torchvision DataLoader reference (He et al. 2015, Sec. 4.2).")
    p.add_argument("--depths", type=depth_type, nargs="+", default=[20, 56], help="6n+2 each")
    p.add_argument("--precisions", nargs="+", choices=tuple(AMP), default=["fp32", "bf16"],
                   help="of ours; bf16 is run.py --amp bf16 (the reference is always fp32)")
    p.add_argument("--compile", action="store_true", help="also measure ours with torch.compile")
    p.add_argument("--bn-batch", type=cli.positive_int, default=None, metavar="K",
                   help="also measure ours with run.py --bn-batch K (batch norm over groups of "
                        "K images), in each precision (and compiled, with --compile)")
    p.add_argument("--warmup", type=cli.non_negative_int, default=10, help="discarded steps")
    p.add_argument("--windows", type=cli.positive_int, default=5,
                   help="timed windows; their median is reported")
    p.add_argument("--steps", type=cli.positive_int, default=20, help="steps per window")
    p.add_argument("--eval-images", type=cli.positive_int, default=10_000,
                   help="test images of the timed evaluation pass")
    p.add_argument("--workers", type=cli.non_negative_int, default=2,
                   help="DataLoader processes of the reference (the popular repos use 2-4)")
    p.add_argument("--no-reference", action="store_true", help="measure ours only")
    p.add_argument("--data-dir", default=default_data_dir("cifar10"),
                   help="binary CIFAR-10 (default: $CIFAR10_DIR, else "
                        f"{os.path.join('data', DATA_FOLDERS['cifar10'][1])}); "
                        "random images if nothing exists at that path")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="CPU threads of both pipelines (default: all cores)")
    p.set_defaults(tf32=False, deterministic=False)  # run.setup_machine's arithmetic
    return p


# ---------------------------------------------------------------- data

def load_data(data_dir):
    """Train and test splits as uint8 tensors on the CPU, the real ones if `data_dir` exists."""
    if os.path.isdir(data_dir):
        start = time.perf_counter()
        images, labels = cifar_binary.load_split(data_dir, "train")
        test_images, test_labels = cifar_binary.load_split(data_dir, "test")
        seconds = time.perf_counter() - start
        source = f"CIFAR-10 from {os.path.abspath(data_dir)}"
    else:  # speed does not depend on the pixels, so the benchmark still means something
        g = torch.Generator().manual_seed(0)
        images, test_images = (torch.randint(0, 256, (k, 3, 32, 32), dtype=torch.uint8,
                                             generator=g) for k in (50_000, 10_000))
        labels, test_labels = (torch.randint(0, 10, (k,), generator=g) for k in (50_000, 10_000))
        seconds = None
        source = f"SYNTHETIC random images ({data_dir} not found; same shapes, same speed)"
    return Data(images, labels, test_images, test_labels, cifar_binary.per_pixel_mean(images),
                source, seconds)


# ---------------------------------------------------------------- the two pipelines

def ours(depth, precision, compile_model, data, device, bn_batch=None):
    """run.py's training iteration and evaluation, with run.py's default (the paper's) recipe,
    or with --bn-batch `bn_batch`."""
    bn = ["--bn-batch", str(bn_batch)] if bn_batch else []
    args = run.parse_args([str((depth - 2) // 6), "train", "--amp", AMP[precision], *bn])
    config = run.experiment_config(args)
    torch.manual_seed(config["seed"])
    model = run.build_model(config, device, config["batch_size"])
    optimizer = run.build_optimizer(model, config)
    if compile_model:  # start afresh, as a run.py process does; earlier pipelines' graphs
        torch.compiler.reset()  # would otherwise count towards dynamo's recompile limit
    step_model = torch.compile(model) if compile_model else model
    images, labels = data.images.to(device), data.labels.to(device)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)
    mean = data.mean.to(device)
    order = run.BatchOrder(config["seed"], len(images), config["batch_size"], device)
    generator = torch.Generator(device=device)
    iterations = itertools.count()

    def step():
        iteration = next(iterations)
        batch = order(iteration)
        generator.manual_seed(run.derived_seed(config["seed"], "augment", iteration))
        run.train_step(step_model, optimizer, images[batch], labels[batch], mean, generator,
                       config["amp"])
        return len(batch)

    def evaluate(count):  # the uncompiled model, as train() evaluates
        run.evaluate(model, test_images[:count], test_labels[:count], mean, config["amp"])

    return Pipeline(step, evaluate, lambda: None)


class ReferenceCIFAR10(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image from a HWC uint8 array."""

    def __init__(self, images, labels, transform):
        self.data = images.numpy().transpose(0, 2, 3, 1)  # (N, 32, 32, 3), as torchvision keeps it
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def endless(loader):
    """Batches of epoch after epoch, a fresh DataLoader iterator per epoch as in the popular
    loops (`for epoch ...: for x, y in loader`); close() shuts the workers down."""
    while True:
        yield from loader


def reference(depth, data, workers, device):
    normalize = transforms.Normalize(CHANNEL_MEAN, CHANNEL_STD)
    train_set = ReferenceCIFAR10(data.images, data.labels, transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize]))
    test_set = ReferenceCIFAR10(data.test_images, data.test_labels,
                                transforms.Compose([transforms.ToTensor(), normalize]))
    loader_options = dict(batch_size=BATCH, num_workers=workers, pin_memory=device.type == "cuda")
    batches = endless(DataLoader(train_set, shuffle=True, **loader_options))
    torch.manual_seed(0)
    model = ResNet((depth - 2) // 6).to(device)
    model.train()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step():
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return len(y)

    def evaluate(count):
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in DataLoader(Subset(test_set, range(count)), **loader_options):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                correct += (model(x).argmax(1) == y).sum().item()  # timed as the repos do it
        model.train()

    return Pipeline(step, evaluate, batches.close)


# ---------------------------------------------------------------- measurements

def wait(device):
    """Return once the device has run everything queued (CPU ops are already synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_speed(step, args, device):
    """(median images/s, median seconds per step) over the timed windows, after the warm-up
    (allocations, oneDNN primitives, DataLoader start-up, compilation)."""
    for _ in range(args.warmup):
        step()
    wait(device)
    rates, step_seconds = [], []
    for _ in range(args.windows):
        start, images = time.perf_counter(), 0
        for _ in range(args.steps):
            images += step()
        wait(device)
        seconds = time.perf_counter() - start
        rates.append(images / seconds)
        step_seconds.append(seconds / args.steps)
    return statistics.median(rates), statistics.median(step_seconds)


def eval_speed(evaluate, count, device):
    """Images/s of one evaluation pass over `count` test images, after a warm-up pass."""
    evaluate(min(count, max(EVAL_BATCH.values())))  # at least one of run.evaluate's batches
    wait(device)
    start = time.perf_counter()
    evaluate(count)
    wait(device)
    return count / (time.perf_counter() - start)


def timed_median(fn, min_run_time):
    """Median seconds of one call of `fn` by torch.utils.benchmark.Timer, which calls it in
    blocks and synchronises the GPU (if any) before each clock reading; on the run's CPU threads
    (Timer's default is one thread)."""
    # Imported here: importing it logs a warning on machines with a CUDA toolkit but no GPU,
    # which would otherwise come before a data error's one line.
    from torch.utils.benchmark import Timer
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def augmentation_seconds(data, device):
    """Median time of cifar_binary.augment + normalize on one batch, as train_step does them."""
    images, mean = data.images[:BATCH].to(device), data.mean.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    return timed_median(lambda: cifar_binary.normalize(cifar_binary.augment(images, generator),
                                                       mean), min_run_time=0.5)


def step_flops(depth):
    """(forward, backward) FLOPs of one training step of ResNet-depth on BATCH images, as
    torch.utils.flop_counter.FlopCounterMode counts them: 2 per multiply-accumulate of the convs
    and the fc layer; BN, ReLU, pooling, shortcuts, loss and SGD have no formula there and are
    left out, as in the usual figures (a few percent). On the meta device: shapes only."""
    model = ResNet((depth - 2) // 6).to("meta")
    images = torch.zeros(BATCH, 3, 32, 32, device="meta")
    labels = torch.zeros(BATCH, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as forward:
        loss = nn.functional.cross_entropy(model(images), labels)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops(), backward.get_total_flops()


def conv_shapes(depth, batch):
    """(conv layer, input shape, output shape) of every conv of ResNet-depth in forward order,
    in a forward pass of `batch` images (on the meta device: shapes only)."""
    model = ResNet((depth - 2) // 6).to("meta")
    shapes = []

    def record(conv, inputs, output):
        shapes.append((conv, inputs[0].shape, output.shape))

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(record)
    with torch.no_grad():
        model(torch.zeros(batch, 3, 32, 32, device="meta"))
    return shapes


def conv_problems(depth, memory_format, dtype, device):
    """(input, weight, output gradient, stride, padding, input needs a gradient) of every conv
    in a training step of ResNet-depth at batch 128, as the pipeline's convs see them."""
    g = torch.Generator().manual_seed(0)

    def tensor(shape):
        return torch.randn(shape, generator=g).to(device, dtype, memory_format=memory_format)

    return [(tensor(x_shape), tensor(conv.weight.shape), tensor(y_shape), conv.stride,
             conv.padding, index > 0)  # the first conv's input is the data: no gradient
            for index, (conv, x_shape, y_shape) in enumerate(conv_shapes(depth, BATCH))]


def conv_seconds(problems):
    """Median time of one step's convolutions alone: each one's forward and its backward to the
    weights (and to its input, but for the first conv), on tensors that stay in the caches they
    fit in. Everything else a step does (batch norm, ReLU, shortcuts, loss, optimizer, data) is
    left out: a step that calls the same convolutions is not faster than this."""
    def step():
        for x, w, grad, stride, padding, input_grad in problems:
            torch.nn.functional.conv2d(x, w, None, stride, padding)
            torch.ops.aten.convolution_backward(grad, x, w, None, stride, padding, (1, 1), False,
                                                (0, 0), 1, (input_grad, True, False))
    step()  # cuDNN's algorithm search (cudnn.benchmark) or oneDNN's primitives, untimed
    return timed_median(step, min_run_time=CONV_TIMING_SECONDS)


def variants(args):
    """(label, precision of ours or None for the reference, compiled, --bn-batch or None), in
    table order."""
    out = [] if args.no_reference else [("reference fp32", None, False, None)]
    for compiled in (False, True) if args.compile else (False,):
        for bn_batch in (None, args.bn_batch) if args.bn_batch else (None,):
            out += [(f"ours {p}" + (f" bn{bn_batch}" if bn_batch else "")
                     + ("+compile" if compiled else ""), p, compiled, bn_batch)
                    for p in args.precisions]
    return out


def benchmark(args, data, device):
    """One Row per depth and pipeline; each pipeline is built, measured and shut down in turn,
    so only one of them uses the cores at a time."""
    rows = []
    for depth in args.depths:
        flops, reference_ips, convs = sum(step_flops(depth)), None, {}  # of one step
        for label, precision, compiled, bn_batch in variants(args):
            print(f"measuring ResNet-{depth} {label}", file=sys.stderr, flush=True)
            pipeline = (reference(depth, data, args.workers, device) if precision is None
                        else ours(depth, precision, compiled, data, device, bn_batch))
            try:
                train_ips, step_seconds = train_speed(pipeline.step, args, device)
                eval_ips = eval_speed(pipeline.evaluate, min(args.eval_images,
                                                             len(data.test_images)), device)
            finally:
                pipeline.close()
            if precision is None:
                reference_ips = train_ips
            if precision not in convs:  # the reference's are NCHW float32; ours channels_last
                convs[precision] = conv_seconds(conv_problems(
                    depth, torch.contiguous_format if precision is None else torch.channels_last,
                    torch.bfloat16 if precision == "bf16" else torch.float32, device))
            rows.append(Row(depth, label, train_ips, step_seconds,
                            train_ips / reference_ips if reference_ips else None,
                            flops * train_ips / BATCH / 1e9, convs[precision], eval_ips))
    return rows


# ---------------------------------------------------------------- report

def header(args, argv, data, device):
    gpu = (f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
           f"cuDNN {torch.backends.cudnn.version()})" if device.type == "cuda" else "")
    float32 = ", ".join(f"{name} {setting.fp32_precision}"
                        for name, setting in run.float32_settings().items())
    return "\n".join([
        "**bench.py: training and evaluation speed, He et al. 2015 Sec. 4.2 ResNets on CIFAR-10**",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %z')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"device {device}{gpu}, CPU threads: {torch.get_num_threads()} for both pipelines, "
        f"git {run.git_commit()}",
        f"- precision: fp32 rows and the reference in IEEE float32, no TF32 (fp32_precision: "
        f"{float32}); bf16 rows: run.py --amp bf16 (bf16 autocast, float32 weights)",
        "- reference: not measured (--no-reference)" if args.no_reference else
        f"- reference: DataLoader with {args.workers} worker processes" + (
            ", which share the cores with the model as they do in the popular repos"
            if args.workers else " (images decoded in the training process)"),
        f"- data: {data.source}",
        f"- timing: batch {BATCH}, warm-up {args.warmup} steps, then the median of "
        f"{args.windows} windows of {args.steps} steps; evaluation: one pass over "
        f"{min(args.eval_images, len(data.test_images)):,} test images; convs alone: the median "
        f"of torch.utils.benchmark.Timer.blocked_autorange over {CONV_TIMING_SECONDS:g} s",
        f"- command: {shlex.join(['python', 'bench.py', *argv])}",
    ])


COLUMNS = ("depth", "pipeline", "train img/s", "speed-up vs reference", "train GFLOP/s",
           "ms/step", "convs alone ms/step", "convs-alone bound", "eval img/s")


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    reference_step = {r.depth: r.step_seconds for r in rows if r.pipeline.startswith("reference")}
    for r in rows:
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
        bound = (f"{reference_step[r.depth] / r.conv_seconds:.2f}x" if r.depth in reference_step
                 else "-")
        lines.append(f"| {r.depth} | {r.pipeline} | {r.train_ips:,.0f} | {speedup} | "
                     f"{r.gflops:.1f} | {1e3 * r.step_seconds:.1f} | "
                     f"{1e3 * r.conv_seconds:.1f} | {bound} | {r.eval_ips:,.0f} |")
    return "\n".join(lines)


def flops_note(depths):
    """The FLOPs behind train GFLOP/s, per image: forward and measured backward."""
    counts = []
    for depth in depths:
        forward, backward = (flops / BATCH / 1e6 for flops in step_flops(depth))
        counts.append(f"ResNet-{depth} {forward:.2f}M + {backward:.2f}M "
                      f"(backward {backward / forward:.2f}x the forward)")
    return ("- FLOPs per image, forward + backward, as train GFLOP/s count them "
            "(torch.utils.flop_counter.FlopCounterMode: 2 per multiply-accumulate of the convs "
            f"and the fc): {', '.join(counts)}")


def notes(data, augment_seconds, rows):
    load = (f"{len(data.images) + len(data.test_images):,} images in {data.load_seconds:.2f} s "
            "(cifar_binary.load_split, train + test)" if data.load_seconds is not None
            else "not measured (synthetic images)")
    shares = ", ".join(f"ResNet-{r.depth} {r.pipeline} {augment_seconds / r.step_seconds:.1%}"
                       for r in rows if r.pipeline.startswith("ours"))
    return "\n".join([
        f"- data load: {load}",
        f"- augmentation (augment + normalize, batch {BATCH}): {1e3 * augment_seconds:.2f} ms, "
        f"as a share of a training step: {shares} (target: under 3%)",
        flops_note(dict.fromkeys(r.depth for r in rows)),
        "- convs-alone bound: the reference's ms/step over the row's convs alone ms/step, the "
        "speed-up the row would reach if everything in a step but its convolutions took no time",
    ])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bn_batch and BATCH % args.bn_batch:
        parser.error(f"--bn-batch {args.bn_batch} must divide the batch of {BATCH}")
    if os.path.lexists(args.data_dir) and not os.path.isdir(args.data_dir):
        # random images stand in only for data that is not there, not for a wrong path
        what = "a broken link" if not os.path.exists(args.data_dir) else "not a folder"
        parser.error(f"--data-dir {args.data_dir}: {what}, expected the folder of CIFAR-10's "
                     "binary batches (or a path where nothing is, for random images)")
    world = run.World()  # one process, also under torchrun
    run.check_device(parser, args.device, world)
    try:
        device = run.setup_machine(args, world)  # float32 is IEEE float32 (no --tf32 here)
        data = load_data(args.data_dir)
        rows = benchmark(args, data, device)
        augment_seconds = augmentation_seconds(data, device)
    except cifar_binary.DataError as e:  # a damaged --data-dir: one line, as run.py reports it
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(header(args, argv, data, device), table(rows), notes(data, augment_seconds, rows),
          sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
