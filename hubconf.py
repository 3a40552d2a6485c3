"""torch.hub entry points for the CIFAR-10 networks of He et al. 2015, Section 4.2: the residual
nets of depth 20, 32, 44, 56, 110 and 1202 and the plain nets of depth 20, 32, 44 and 56.

    model = torch.hub.load("path/to/this/checkout", "resnet20", source="local", pretrained=True)
    logits = model(images)  # float (B, 3, 32, 32) in [0, 1]: what transforms.ToTensor() makes

pretrained=True returns the published weights wrapped in `ToTensorInput`, in eval mode: it takes
images as torchvision gives them (RGB, float in [0, 1], no transforms.Normalize) and turns them
into what the network was trained on, 0-255 pixel values minus the per-pixel mean of the training
images stored with the weights. It works for the nets in PUBLISHED, trained in bf16 on the
paper's full schedule (their test errors: results/table6.md); for the others it raises a
ValueError that names them. run="<folder>" loads instead the weights of another published run of
that net, a folder of results/runs (resnet56: "resnet56-bf16" for BN over 128 images, seed 0;
"resnet56-bf16-seed1"); a folder that holds none of that net's is a ValueError naming those that
do. Each load checks the weights against the digest stored with them
(run.py's sha256 of every tensor): a damaged model.pt is refused, naming the file, instead of
giving wrong logits. The wrapper refuses input it cannot mean (raw bytes, 0-255 floats,
normalized images, another shape or layout) with a ValueError naming what it expects.

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

# Published weights: entry -> model.pt of a finished run, relative to this file's folder; of
# several runs of one net, one of the default recipe (run.py's). Publishing another net is one
# line here; every run folder of RUNS with a model.pt is reachable through run=.
RUNS = "results/runs"
PUBLISHED = {
    "resnet20": "results/runs/resnet20-bf16/model.pt",
    "resnet56": "results/runs/resnet56-bf16-bn64/model.pt",
    "plain20": "results/runs/plain20-bf16/model.pt",
    "plain56": "results/runs/plain56-bf16/model.pt",
}


class ToTensorInput(nn.Module):
    """`net`, trained on 0-255 pixel values minus `per_pixel_mean` (3, 32, 32) as run.py trains
    it (cifar_binary.normalize), made to take images as torchvision's transforms.ToTensor()
    gives them: float (B, 3, 32, 32) in [0, 1], RGB, without transforms.Normalize.

    forward computes net(x * 255 - per_pixel_mean). For ToTensor's output, byte / 255, this is
    exactly byte - mean in float32 (byte / 255 * 255 rounds back to byte for all 256 values), so
    the logits are those of the net on the project's own preprocessing, bit for bit. Other input
    would give confident nonsense (uint8 wraps around at x * 255, 0-255 floats put every image in
    one class, one channel or 64x64 images broadcast or fail deep inside), so it is refused with
    a ValueError: a floating point tensor of shape (B, 3, 32, 32), every value in [0, 1].
    """

    def __init__(self, net, per_pixel_mean):
        super().__init__()
        if tuple(per_pixel_mean.shape) != (3, 32, 32):
            raise ValueError(f"per_pixel_mean must have shape (3, 32, 32), got "
                             f"{tuple(per_pixel_mean.shape)}")
        self.net = net
        self.register_buffer("per_pixel_mean", per_pixel_mean.detach().float().clone())

    def forward(self, x):  # (B, 3, 32, 32) float in [0, 1] -> (B, num_classes) logits
        _check_input(x)
        x = x.to(self.per_pixel_mean.dtype)  # float64 from numpy, or a model made .double()
        return self.net(x * 255 - self.per_pixel_mean)


_EXPECTED_INPUT = ("expected float images in [0, 1] of shape (B, 3, 32, 32), as "
                  "transforms.ToTensor() makes them (batched, without transforms.Normalize)")


def _check_input(x):
    """A ValueError, naming what ToTensorInput expects, unless `x` is a floating point tensor
    of shape (B, 3, 32, 32) with every value in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{_EXPECTED_INPUT}; got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{_EXPECTED_INPUT}; got dtype {x.dtype} (divide bytes by 255)")
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
        raise ValueError(f"{_EXPECTED_INPUT}; got shape {tuple(x.shape)}")
    if x.numel():
        low, high = torch.aminmax(x)  # NaN compares false: refused too
        if not (low >= 0 and high <= 1):
            raise ValueError(f"{_EXPECTED_INPUT}; got values from {low.item():g} to "
                             f"{high.item():g}")


def _published_runs(name):
    """The folders of RUNS that hold weights (model.pt) of the net `name`, named as run.py names
    its runs: `name`, or `name` and its settings (resnet56-bf16-bn64)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), RUNS)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(d for d in names if (d == name or d.startswith(name + "-"))
                  and os.path.isfile(os.path.join(folder, d, "model.pt")))


def _weights_path(name, run):
    if run is None and name not in PUBLISHED:
        raise ValueError(f"{name}: no published weights; pretrained=True exists for "
                         f"{', '.join(PUBLISHED)} (pretrained=False gives the untrained net)")
    if run is not None:
        runs = _published_runs(name)  # listed once: checked against, and named if refused
        if run not in runs:
            raise ValueError(f"run={run!r}: not a published run of {name}; expected a folder "
                             f"of {RUNS} with its weights: {', '.join(runs) or 'none'}")
    relative = PUBLISHED[name] if run is None else os.path.join(RUNS, run, "model.pt")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), relative)


def _model(name, pretrained, run=None):
    n, plain = MATRIX[name]
    if run is not None and not pretrained:
        raise ValueError(f"run={run!r} chooses published weights: give pretrained=True with it")
    if not pretrained:
        return resnet.ResNet(n, plain=plain)
    path = _weights_path(name, run)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the published weights of {name} are missing from "
                                "this checkout")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({reason}); restore the file from "
                         "the repository") from None
    _check_digest(path, state)
    config = state["config"]
    if (config["n"], config["plain"], config["shortcut"]) != (n, plain, "A"):
        raise ValueError(f"{path}: holds n={config['n']}, plain={config['plain']}, shortcut "
                         f"{config['shortcut']}, not {name}")
    net = resnet.ResNet(n, plain=plain, num_classes=len(state["model"]["fc.bias"]))
    net.load_state_dict(state["model"])
    return ToTensorInput(net, state["per_pixel_mean"]).eval()


def _check_digest(path, state):
    """A ValueError naming `path` unless the checkpoint `state` holds the digest of its
    contents, as run.py stores it with the weights it writes (run.tensor_digest)."""
    import run  # its checkpoint format; imported here, where published weights are loaded
    if not isinstance(state, dict) or "digest" not in state:
        raise ValueError(f"{path}: no digest stored with the weights, so they cannot be checked; "
                         "published weights carry one (restore the file from the repository)")
    if state["digest"] != run.tensor_digest(state):
        raise ValueError(f"{path}: damaged (its contents do not match the digest stored with "
                         "them); restore the file from the repository")


def resnet20(pretrained=False, run=None):
    """ResNet-20 (269,722 parameters); see this module's docstring."""
    return _model("resnet20", pretrained, run)


def resnet32(pretrained=False, run=None):
    """ResNet-32 (464,154 parameters); see this module's docstring."""
    return _model("resnet32", pretrained, run)


def resnet44(pretrained=False, run=None):
    """ResNet-44 (658,586 parameters); see this module's docstring."""
    return _model("resnet44", pretrained, run)


def resnet56(pretrained=False, run=None):
    """ResNet-56 (853,018 parameters); see this module's docstring."""
    return _model("resnet56", pretrained, run)


def resnet110(pretrained=False, run=None):
    """ResNet-110 (1,727,962 parameters); see this module's docstring."""
    return _model("resnet110", pretrained, run)


def resnet1202(pretrained=False, run=None):
    """ResNet-1202 (19,421,274 parameters); see this module's docstring."""
    return _model("resnet1202", pretrained, run)


def plain20(pretrained=False, run=None):
    """Plain-20, no shortcuts (269,722 parameters); see this module's docstring."""
    return _model("plain20", pretrained, run)


def plain32(pretrained=False, run=None):
    """Plain-32, no shortcuts (464,154 parameters); see this module's docstring."""
    return _model("plain32", pretrained, run)


def plain44(pretrained=False, run=None):
    """Plain-44, no shortcuts (658,586 parameters); see this module's docstring."""
    return _model("plain44", pretrained, run)


def plain56(pretrained=False, run=None):
    """Plain-56, no shortcuts (853,018 parameters); see this module's docstring."""
    return _model("plain56", pretrained, run)
