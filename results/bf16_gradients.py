"""How far bf16 autocast and BN over 64 images move a training step's gradient, against how far
another batch moves it: for ResNet weights (at initialisation, or from a checkpoint or
model.pt), the loss gradient of one augmented batch of 128 in float32 with BN over all 128 (the
reference), under bf16 autocast (as run.py trains with --amp bf16), with BN over each 64 (as
--bn-batch 64), and of another batch. Prints a markdown table.

    python results/bf16_gradients.py --data-dir $CIFAR10_DIR init results/runs/resnet56-bf16/model.pt
"""
import argparse
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


def gradient(model, x, y, amp):
    model.zero_grad(set_to_none=True)
    with run.autocast(x.device, amp):
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)).float(), y)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def compare(models, images, labels, mean, batches, seed):
    """Per batch, the relative difference to the float32 gradient of BN over 128 images of:
    bf16 autocast, BN over each 64 images, another batch (each its own). Also how much of each
    difference persists from batch to batch (|mean of the differences| / mean |difference|:
    about 1/sqrt(batches) for independent noise, 1 for a bias), and bf16's relative error per
    parameter, averaged over the batches."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    batch = lambda i: order[i * 128:(i + 1) * 128]
    x = [cifar_binary.normalize(cifar_binary.augment(images[batch(i)], generator), mean)
         for i in range(2 * batches)]
    y = [labels[batch(i)] for i in range(2 * batches)]
    differences = {"bf16": [], "bn64": [], "another batch": []}
    per_param = {}
    for i in range(batches):
        g32 = gradient(models[128], x[i], y[i], "none")
        g16 = gradient(models[128], x[i], y[i], "bf16")
        for name in g32:
            error = ((g16[name] - g32[name]).norm() / g32[name].norm().clamp_min(1e-30)).item()
            per_param[name] = per_param.get(name, 0.0) + error / batches
        others = {"bf16": g16, "bn64": gradient(models[64], x[i], y[i], "none"),
                  "another batch": gradient(models[128], x[batches + i], y[batches + i], "none")}
        for kind, g in others.items():
            differences[kind].append((flat(g) - flat(g32), flat(g32).norm()))
    summary = {}
    for kind, pairs in differences.items():
        size = statistics.median((d.norm() / n).item() for d, n in pairs)
        persistence = (torch.stack([d for d, _ in pairs]).mean(0).norm()
                       / statistics.mean(d.norm().item() for d, _ in pairs)).item()
        summary[kind] = (size, persistence)
    return summary, per_param


def weights(spec, n):
    """The same weights with BN over 128 images and over each 64 (training mode)."""
    if spec == "init":
        torch.manual_seed(0)
        config = {**RECIPE, "n": n, "plain": False, "shortcut": "A", "dataset": "cifar10"}
        state = run.build_model({**config, "bn_batch": 128}, torch.device("cpu")).state_dict()
    else:
        loaded = run.load_checkpoint(spec)
        config, state = loaded["config"], loaded["model"]
    models = {}
    for bn_batch in (128, 64):
        models[bn_batch] = run.build_model({**config, "bn_batch": bn_batch}, torch.device("cpu"),
                                           batch_share=128)
        models[bn_batch].load_state_dict(state)
        models[bn_batch].train()
    return models


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="+", help="'init' or a checkpoint.pt / model.pt")
    p.add_argument("--n", type=int, default=9, help="blocks per stage for 'init' (9: ResNet-56)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batches", type=cli.positive_int, default=8,
                   help="batches compared (twice as many are read)")
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
    print(f"| weights | bf16: relative difference (persistence) | BN over 64: relative difference "
          f"(persistence) | another batch: relative difference (persistence) | parameters bf16 "
          f"moves most (relative error) |")
    print("| --- | --- | --- | --- | --- |")
    for spec in args.weights:
        summary, per_param = compare(weights(spec, args.n), images, labels, mean, args.batches,
                                     seed=1)
        worst = sorted(per_param.items(), key=lambda kv: -kv[1])[:3]
        cells = [f"{size:.3f} ({persistence:.2f})" for size, persistence in summary.values()]
        print(f"| {spec} | " + " | ".join(cells) + " | "
              + ", ".join(f"{name} {error:.2f}" for name, error in worst) + " |")
    print(f"\n{args.batches} batches of 128 augmented training images; relative differences to "
          "the float32 gradient with BN over 128 (medians); persistence 1/sqrt(batches) = "
          f"{args.batches ** -0.5:.2f} for independent noise, 1 for a bias.")


if __name__ == "__main__":
    sys.exit(main())
