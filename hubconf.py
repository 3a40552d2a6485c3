"""torch.hub entry points for the CIFAR-10 networks of He et al. 2015, Section 4.2: the residual
nets of depth 20, 32, 44, 56, 110 and 1202 and the plain nets of depth 20, 32, 44 and 56.

    model = torch.hub.load("path/to/this/checkout", "resnet20", source="local", pretrained=True)
    logits = model(images)  # float (B, 3, 32, 32) in [0, 1]: what transforms.ToTensor() makes

pretrained=True returns the published weights wrapped in `ToTensorInput`, in eval mode: it takes
images as torchvision gives them (RGB, float in [0, 1], no transforms.Normalize) and turns them
into what the network was trained on, 0-255 pixel values minus the per-pixel mean of the training
images stored with the weights. It works for the nets in PUBLISHED, trained in bf16 on the
paper's full schedule (their test errors: results/table6.md); for the others it raises a
ValueError that names them.

pretrained=False returns the bare `resnet.ResNet`, freshly initialised and with no
preprocessing: without training images there is no per-pixel mean. Train it on what you will
feed it (run.py feeds 0-255 pixels minus the mean, see cifar_binary.normalize); a net trained
that way takes ToTensor() images once wrapped: ToTensorInput(net, per_pixel_mean).
"""
import os

import torch
from torch import nn

import resnet
from experiment import MATRIX  # entry -> (n, plain): option A shortcuts unless plain

dependencies = ["torch"]

# Published weights: entry -> model.pt of a finished run, relative to this file's folder.
# Publishing another net is one line here.
PUBLISHED = {
    "resnet20": "results/runs/resnet20-bf16/model.pt",
    "resnet56": "results/runs/resnet56-bf16/model.pt",
    "plain20": "results/runs/plain20-bf16/model.pt",
    "plain56": "results/runs/plain56-bf16/model.pt",
}


class ToTensorInput(nn.Module):
    """`net`, trained on 0-255 pixel values minus `per_pixel_mean` (3, 32, 32) as run.py trains
    it (cifar_binary.normalize), made to take images as torchvision's transforms.ToTensor()
    gives them: float (B, 3, 32, 32) in [0, 1], RGB, without transforms.Normalize.

    forward computes net(x * 255 - per_pixel_mean). For ToTensor's output, byte / 255, this is
    exactly byte - mean in float32 (byte / 255 * 255 rounds back to byte for all 256 values), so
    the logits are those of the net on the project's own preprocessing, bit for bit.
    """

    def __init__(self, net, per_pixel_mean):
        super().__init__()
        if tuple(per_pixel_mean.shape) != (3, 32, 32):
            raise ValueError(f"per_pixel_mean must have shape (3, 32, 32), got "
                             f"{tuple(per_pixel_mean.shape)}")
        self.net = net
        self.register_buffer("per_pixel_mean", per_pixel_mean.detach().float().clone())

    def forward(self, x):  # (B, 3, 32, 32) float in [0, 1] -> (B, num_classes) logits
        return self.net(x * 255 - self.per_pixel_mean)


def _model(name, pretrained):
    n, plain = MATRIX[name]
    if not pretrained:
        return resnet.ResNet(n, plain=plain)
    if name not in PUBLISHED:
        raise ValueError(f"{name}: no published weights; pretrained=True exists for "
                         f"{', '.join(PUBLISHED)} (pretrained=False gives the untrained net)")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), PUBLISHED[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the published weights of {name} are missing from "
                                "this checkout")
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = state["config"]
    if (config["n"], config["plain"], config["shortcut"]) != (n, plain, "A"):
        raise ValueError(f"{path}: holds n={config['n']}, plain={config['plain']}, shortcut "
                         f"{config['shortcut']}, not {name}")
    net = resnet.ResNet(n, plain=plain, num_classes=len(state["model"]["fc.bias"]))
    net.load_state_dict(state["model"])
    return ToTensorInput(net, state["per_pixel_mean"]).eval()


def resnet20(pretrained=False):
    """ResNet-20 (269,722 parameters); see this module's docstring."""
    return _model("resnet20", pretrained)


def resnet32(pretrained=False):
    """ResNet-32 (464,154 parameters); see this module's docstring."""
    return _model("resnet32", pretrained)


def resnet44(pretrained=False):
    """ResNet-44 (658,586 parameters); see this module's docstring."""
    return _model("resnet44", pretrained)


def resnet56(pretrained=False):
    """ResNet-56 (853,018 parameters); see this module's docstring."""
    return _model("resnet56", pretrained)


def resnet110(pretrained=False):
    """ResNet-110 (1,727,962 parameters); see this module's docstring."""
    return _model("resnet110", pretrained)


def resnet1202(pretrained=False):
    """ResNet-1202 (19,421,274 parameters); see this module's docstring."""
    return _model("resnet1202", pretrained)


def plain20(pretrained=False):
    """Plain-20, no shortcuts (269,722 parameters); see this module's docstring."""
    return _model("plain20", pretrained)


def plain32(pretrained=False):
    """Plain-32, no shortcuts (464,154 parameters); see this module's docstring."""
    return _model("plain32", pretrained)


def plain44(pretrained=False):
    """Plain-44, no shortcuts (658,586 parameters); see this module's docstring."""
    return _model("plain44", pretrained)


def plain56(pretrained=False):
    """Plain-56, no shortcuts (853,018 parameters); see this module's docstring."""
    return _model("plain56", pretrained)
