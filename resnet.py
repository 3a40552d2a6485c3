"""The CIFAR-10 networks of He et al. 2015, "Deep Residual Learning for Image Recognition",
Section 4.2: residual and plain nets of depth 6n+2.

    3x3 conv, 16 filters (32x32 maps)
    n blocks of two 3x3 convs, 16 filters (32x32)
    n blocks of two 3x3 convs, 32 filters (16x16; the first conv has stride 2)
    n blocks of two 3x3 convs, 64 filters (8x8;   the first conv has stride 2)
    global average pool, 10-way fully-connected, softmax

Every conv is followed by batch norm (so convs have no bias). Shortcuts, option A (the paper's
choice for CIFAR): identity, and where the dimensions grow, stride-2 subsampling with the extra
channels zero, no parameters. Option B: a 1x1 conv + BN projection where the dimensions grow.
A plain net is the same stack with no shortcuts. The paper trained on two GPUs with 64 images
each, and BN of its time normalised over each GPU's images alone: `bn_batch=64` gives every
group of 64 consecutive images of a batch its own statistics, as those GPUs did. With option A,
plain and residual nets have the same number of parameters:

    n    depth   params       n    depth   params
    3    20      269,722      18   110     1,727,962
    5    32      464,154      200  1202    19,421,274
    7    44      658,586
    9    56      853,018

`python resnet.py` prints this table from the code.
"""
import torch
import torch.nn.functional as F
from torch import nn

from experiment import depth_of


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by `stride` and append zero channels up to `out_channels`."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics are those of each group of `group` consecutive
    images of the batch (None: the whole batch), as each of several GPUs normalises its own
    share ("ghost batch norm"). The running statistics follow the first group, as the first
    GPU's do; in eval mode it is nn.BatchNorm2d."""

    def __init__(self, num_features, group=None):
        super().__init__(num_features)
        self.group = group

    def forward(self, x):
        if not self.training or self.group is None or len(x) == self.group:
            return super().forward(x)
        if len(x) % self.group:
            raise ValueError(f"a batch of {len(x)} images does not split into groups of "
                             f"{self.group} for batch norm")
        first, *others = x.split(self.group)
        return torch.cat([super().forward(first)] + [
            F.batch_norm(group, None, None, self.weight, self.bias, True, 0.0, self.eps)
            for group in others])


class Block(nn.Module):
    """Two 3x3 conv+BN layers; ReLU after the first and after the (shortcut sum and) second."""

    def __init__(self, in_channels, out_channels, stride, shortcut, bn_batch=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = GhostBatchNorm2d(out_channels, bn_batch)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = GhostBatchNorm2d(out_channels, bn_batch)
        grows = stride != 1 or in_channels != out_channels
        if shortcut is None:  # plain net
            self.shortcut = None
        elif not grows:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:  # "B"
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                GhostBatchNorm2d(out_channels, bn_batch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """ResNet(n) has 6n+2 weighted layers; plain=True drops every shortcut; bn_batch=K: batch
    norm over groups of K images in training (None: over the whole batch)."""

    def __init__(self, n, plain=False, shortcut="A", num_classes=10, bn_batch=None):
        super().__init__()
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.n, self.plain, self.shortcut = n, plain, shortcut
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = GhostBatchNorm2d(16, bn_batch)
        blocks, in_channels = [], 16
        for stage, channels in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Block(in_channels, channels, stride, None if plain else shortcut,
                                    bn_batch))
                in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He et al. 2015 (PReLU paper) init, as in Sec. 3.4
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def depth(self):
        return depth_of(self.n)

    def forward(self, x):  # (B, 3, 32, 32) float -> (B, num_classes) logits
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def response_layers(model):
    """The BN after each of the 6n+1 3x3 convs, in network order (projection BNs excluded).

    Their outputs are the "layer responses" of the paper's Figure 7: after BN, before the ReLU
    or the shortcut addition.
    """
    layers = [model.bn1]
    for block in model.blocks:
        layers += [block.bn1, block.bn2]
    return layers


class LayerResponses:
    """Accumulates the std of every response layer's output over all forward passes inside
    a `with` block, without touching the model's forward:

        with LayerResponses(model) as responses:
            for x in batches: model(x)
        responses.std()  # list of floats, network order

    The std is over every element of a layer's output (images, channels, positions).
    """

    def __init__(self, model):
        self.layers = response_layers(model)
        self.sums = torch.zeros(len(self.layers), 3, dtype=torch.float64)  # count, sum, sum sq
        self.handles = []

    def _hook(self, index):
        def hook(module, inputs, output):
            out = output.detach().float()
            self.sums[index] += torch.stack([
                torch.tensor(out.numel(), dtype=torch.float64, device=out.device),
                out.sum(dtype=torch.float64), out.square().sum(dtype=torch.float64)]).cpu()
        return hook

    def __enter__(self):
        self.handles = [layer.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def std(self):
        count, total, total_sq = self.sums.unbind(1)
        mean = total / count
        return (total_sq / count - mean.square()).clamp_min(0).sqrt().tolist()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    print("| n | depth | residual params | plain params | option B params |")
    print("|---|---|---|---|---|")
    for n in (3, 5, 7, 9, 18, 200):
        counts = [count_parameters(ResNet(n, **kw)) for kw in
                  ({}, {"plain": True}, {"shortcut": "B"})]
        print(f"| {n} | {depth_of(n)} | " + " | ".join(f"{c:,}" for c in counts) + " |")
