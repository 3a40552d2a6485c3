"""How far bf16 autocast and BN over 64 images move the loss gradient of one batch, against how far
another batch moves it: for ResNet weights (at initialisation, or from a checkpoint or
model.pt), the gradient of one augmented batch of 128 in float32 with BN over all 128 (the
reference), under bf16 autocast (as run.py trains with --amp bf16), with BN over each 64 (as
--bn-batch 64), and of another batch. Prints a markdown table.

    python results/bf16_gradients.py --data-dir $CIFAR10_DIR init results/runs/resnet56-bf16/model.pt
"""
import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar_binary  # noqa: E402
import cli  # noqa: E402
import run  # noqa: E402
from experiment import RECIPE  # noqa: E402

KINDS = ("bf16", "BN over 64", "another batch")
REMEDY = "pass 'init' or a checkpoint.pt or model.pt of this project's runs"


def gradient(net, x, y, amp):
    """{parameter name: the loss gradient} of one batch; `net` is (module, its forward)."""
    module, forward = net
    module.zero_grad(set_to_none=True)
    with run.autocast(x.device, amp):
        loss = F.cross_entropy(forward(x.contiguous(memory_format=torch.channels_last)).float(), y)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def differences(nets, images, labels, mean, batches, seed):
    """For each kind, per batch: (its gradient - the reference's, the reference's norm); and
    bf16's relative error per parameter, averaged over the batches."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    batch = lambda i: order[i * 128:(i + 1) * 128]
    x = [cifar_binary.normalize(cifar_binary.augment(images[batch(i)], generator), mean)
         for i in range(2 * batches)]
    y = [labels[batch(i)] for i in range(2 * batches)]
    found, per_param = {kind: [] for kind in KINDS}, {}
    for i in range(batches):
        g32 = gradient(nets[128], x[i], y[i], "none")
        g16 = gradient(nets[128], x[i], y[i], "bf16")
        for name in g32:
            error = ((g16[name] - g32[name]).norm() / g32[name].norm().clamp_min(1e-30)).item()
            per_param[name] = per_param.get(name, 0.0) + error / batches
        others = (g16, gradient(nets[64], x[i], y[i], "none"),
                  gradient(nets[128], x[batches + i], y[batches + i], "none"))
        reference = flat(g32)
        reference_norm = reference.norm()
        for kind, g in zip(KINDS, others):
            found[kind].append((flat(g) - reference, reference_norm))
    return found, per_param


def summary(pairs, noise_ms):
    """Median and root mean square of the relative differences; persistence (|mean difference|
    / mean |difference|) and what it would be without a bias (sqrt(sum |d|^2) / sum |d|); the
    mean square against the batch noise's (half another batch's: two batches' noises add)."""
    lengths = [d.norm() for d, _ in pairs]
    sizes = [(length / n).item() for length, (_, n) in zip(lengths, pairs)]
    norms = [length.item() for length in lengths]
    mean_difference = torch.stack([d for d, _ in pairs]).mean(0).norm().item()
    ms = statistics.mean(s * s for s in sizes)
    return (statistics.median(sizes), math.sqrt(ms), mean_difference / statistics.mean(norms),
            math.sqrt(sum(v * v for v in norms)) / sum(norms), ms / (noise_ms / 2))


def nets_of(spec, n, compile):
    """The same weights with BN over 128 images and over each 64 (training mode), each as
    (module, forward), the forward compiled with --compile as run.py --compile trains."""
    if spec == "init":
        torch.manual_seed(0)  # as run.py initialises seed 0
        config = {**RECIPE, "n": n, "plain": False, "shortcut": "A", "dataset": "cifar10"}
        state = run.build_model({**config, "bn_batch": 128}, torch.device("cpu")).state_dict()
    else:
        loaded = run.load_checkpoint(spec, remedy=REMEDY)
        config, state = loaded["config"], loaded["model"]
    nets = {}
    for bn_batch in (128, 64):
        module = run.build_model({**config, "bn_batch": bn_batch}, torch.device("cpu"),
                                 batch_share=128)
        with run.checkpoint_must_fit(spec, config, REMEDY):
            module.load_state_dict(state)
        module.train()
        nets[bn_batch] = (module, torch.compile(module) if compile else module)
    if spec != "init":
        run.verify_digest(spec, loaded, REMEDY)  # a damaged byte inside a tensor
    return nets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="+", help="'init' or a checkpoint.pt / model.pt")
    p.add_argument("--n", type=int, default=9, help="blocks per stage for 'init' (9: ResNet-56)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batches", type=cli.positive_int, default=8,
                   help="batches compared (twice as many are read)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward passes")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        table(args)
    except (run.RunError, cifar_binary.DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def table(args):
    images, labels = cifar_binary.load_split(args.data_dir, "train")
    if len(images) < 2 * args.batches * 128:
        raise ValueError(f"--batches {args.batches}: {args.data_dir} holds {len(images):,} "
                         f"training images, fewer than the {2 * args.batches * 128:,} it needs")
    mean = cifar_binary.per_pixel_mean(images)
    print("| weights | against float32, BN over 128 | relative difference: median | rms | "
          "persistence | without a bias | mean square against the batch noise's |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    moved_most = []
    for spec in args.weights:
        found, per_param = differences(nets_of(spec, args.n, args.compile), images, labels,
                                       mean, args.batches, seed=1)
        noise_ms = statistics.mean((d.norm() / n).item() ** 2 for d, n in found["another batch"])
        for kind in KINDS:
            median, rms, persistence, unbiased, share = summary(found[kind], noise_ms)
            share = "(the reference)" if kind == "another batch" else f"{100 * share:.1f}%"
            print(f"| {spec} | {kind} | {median:.3f} | {rms:.3f} | {persistence:.2f} | "
                  f"{unbiased:.2f} | {share} |")
        worst = sorted(per_param.items(), key=lambda kv: -kv[1])[:3]
        moved_most.append(f"{spec}: " + ", ".join(f"{name} {e:.2f}" for name, e in worst))
    print(f"\n{args.batches} batches of 128 augmented training images"
          f"{', compiled' if args.compile else ''}. Parameters whose gradient bf16 moves most "
          "(relative error): " + "; ".join(moved_most) + ".")


if __name__ == "__main__":
    sys.exit(main())
