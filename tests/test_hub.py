"""hubconf.py through torch.hub.load(source="local") on this checkout: every depth of the
paper, the published weights behind a wrapper that takes transforms.ToTensor() images, and a
clear error for nets without published weights."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torchvision import transforms

import cifar_binary
import hubconf
from resnet import ResNet, count_parameters
from test_published import published_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {  # entry -> (depth, plain, parameters)
    "resnet20": (20, False, 269_722), "resnet32": (32, False, 464_154),
    "resnet44": (44, False, 658_586), "resnet56": (56, False, 853_018),
    "resnet110": (110, False, 1_727_962), "resnet1202": (1202, False, 19_421_274),
    "plain20": (20, True, 269_722), "plain32": (32, True, 464_154),
    "plain44": (44, True, 658_586), "plain56": (56, True, 853_018),
}


def hub_load(name, **kwargs):
    return torch.hub.load(ROOT, name, source="local", **kwargs)


def published_weights(name):
    return torch.load(os.path.join(ROOT, hubconf.PUBLISHED[name]), map_location="cpu",
                      weights_only=True)


@pytest.fixture(scope="module")
def published():
    return published_weights("resnet20")


@pytest.fixture(scope="module")
def resnet20():
    return hub_load("resnet20", pretrained=True)


def test_hub_entries_are_the_papers_nets_and_the_wrapper():
    # what torch.hub.list shows: the public callables of hubconf.py
    entries = {name for name in dir(hubconf)
               if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entries == set(PAPER) | {"ToTensorInput"}
    assert hubconf.dependencies == ["torch"]
    assert set(hubconf.PUBLISHED) <= set(PAPER)


@pytest.mark.parametrize("name", PAPER)
def test_untrained_entry_is_the_bare_network_of_the_papers_depth(name):
    depth, plain, params = PAPER[name]
    model = hub_load(name)
    assert type(model) is ResNet  # no preprocessing: there is no mean without training images
    assert (model.depth, model.plain, model.shortcut) == (depth, plain, "A")
    assert count_parameters(model) == params


@pytest.mark.parametrize("name", [name for name in PAPER if name not in hubconf.PUBLISHED])
def test_pretrained_without_published_weights_is_an_error_naming_those_that_exist(name):
    with pytest.raises(ValueError) as e:
        hub_load(name, pretrained=True)
    assert str(e.value).startswith(f"{name}: no published weights; pretrained=True exists for "
                                   f"{', '.join(hubconf.PUBLISHED)} ")


@pytest.mark.parametrize("name", hubconf.PUBLISHED)
def test_pretrained_entry_holds_the_published_weights_and_mean_in_eval_mode(name):
    model, published = hub_load(name, pretrained=True), published_weights(name)
    depth, plain, _ = PAPER[name]
    assert not model.training and not model.net.training
    assert type(model.net) is ResNet and (model.net.depth, model.net.plain) == (depth, plain)
    state = model.net.state_dict()
    assert state.keys() == published["model"].keys()
    assert all(torch.equal(state[k], published["model"][k]) for k in state)
    assert torch.equal(model.per_pixel_mean, published["per_pixel_mean"])
    assert "per_pixel_mean" in dict(model.named_buffers())  # moves with .to(device)


def test_run_loads_the_weights_of_another_published_run_of_the_net():
    assert hubconf.PUBLISHED["resnet56"] == "results/runs/resnet56-bf16-bn64/model.pt"
    assert hubconf._published_runs("resnet56") == [
        "resnet56-bf16", "resnet56-bf16-bn64", "resnet56-bf16-seed1", "resnet56-fp32"]
    for run in hubconf._published_runs("resnet56"):
        model = hub_load("resnet56", pretrained=True, run=run)
        published = torch.load(os.path.join(ROOT, "results", "runs", run, "model.pt"),
                               map_location="cpu", weights_only=True)
        state = model.net.state_dict()
        assert all(torch.equal(state[k], published["model"][k]) for k in published["model"])
        assert torch.equal(model.per_pixel_mean, published["per_pixel_mean"])
        assert not model.training


@pytest.mark.parametrize("name, run", [("resnet56", "resnet20-bf16"), ("resnet56", "resnet56"),
                                       ("resnet56", "../runs/resnet56-bf16"), ("resnet56", 0),
                                       ("resnet56", "resnet56-bf16-iters6400"),
                                       ("resnet110", "resnet56-bf16")])
def test_a_run_that_holds_no_weights_of_the_net_is_an_error_naming_those_that_do(name, run):
    with pytest.raises(ValueError) as e:
        hub_load(name, pretrained=True, run=run)
    runs = ", ".join(hubconf._published_runs(name)) or "none"
    assert str(e.value) == (f"run={run!r}: not a published run of {name}; expected a folder of "
                            f"results/runs with its weights: {runs}")


def test_run_without_pretrained_is_an_error():
    with pytest.raises(ValueError, match=r"^run='resnet56-bf16' chooses published weights: "):
        hub_load("resnet56", run="resnet56-bf16")


def test_every_byte_divided_by_255_and_scaled_back_is_that_byte_exactly():
    byte = torch.arange(256, dtype=torch.uint8).view(1, 256, 1)
    as_torchvision_gives_it = transforms.ToTensor()(byte.numpy().transpose(1, 2, 0))
    assert as_torchvision_gives_it.dtype == torch.float32
    assert torch.equal(as_torchvision_gives_it * 255, byte.float())


def test_to_tensor_images_give_exactly_the_logits_of_the_net_on_its_own_preprocessing(
        resnet20, published):
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    to_tensor = transforms.ToTensor()
    x = torch.stack([to_tensor(Image.fromarray(image.permute(1, 2, 0).numpy()))
                     for image in images])  # how a torchvision user feeds the model
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and 0 <= x.min() <= x.max() <= 1
    net = ResNet(3).eval()
    net.load_state_dict(published["model"])
    with torch.inference_mode():
        ours = net(cifar_binary.normalize(images, published["per_pixel_mean"]))
        theirs = resnet20(x)
    assert torch.equal(theirs, ours)
    assert (theirs.argmax(1) == ours.argmax(1)).all()


def test_to_tensor_input_wraps_any_net_with_its_mean():
    net, mean = ResNet(1).eval(), torch.full((3, 32, 32), 100.0)
    model = torch.hub.load(ROOT, "ToTensorInput", net, mean, source="local")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), net(x * 255 - 100))
    with pytest.raises(ValueError, match=r"shape \(3, 32, 32\), got \(3,\)"):
        torch.hub.load(ROOT, "ToTensorInput", net, torch.zeros(3), source="local")


def nonsense_input(kind):
    """Images that ToTensorInput cannot mean, the way a user gets them wrong."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)  # what ToTensor() makes, batched
    return {
        "uint8": (images * 255).to(torch.uint8),  # the raw bytes: x * 255 wraps around
        "0-255 floats": images * 255,  # byte values as floats: every image of one class
        "normalized": (images - 0.5) / 0.25,  # after transforms.Normalize
        "nan": images.masked_fill(images > 0.99, float("nan")),
        "1 channel": images[:, :1],  # greyscale: broadcast to 3 channels
        "NHWC": images.permute(0, 2, 3, 1).contiguous(),  # numpy/PIL layout
        "64x64": torch.rand(2, 3, 64, 64, generator=g),
        "unbatched": images[0],
    }[kind]


@pytest.mark.parametrize("kind", ["uint8", "0-255 floats", "normalized", "nan", "1 channel",
                                  "NHWC", "64x64", "unbatched"])
def test_input_the_wrapper_cannot_mean_is_a_value_error_naming_the_expected_input(kind):
    model = hubconf.ToTensorInput(ResNet(1).eval(), torch.full((3, 32, 32), 100.0))
    with torch.inference_mode(), pytest.raises(ValueError) as e:
        model(nonsense_input(kind))
    message = str(e.value)
    assert "\n" not in message
    assert "[0, 1]" in message and "(B, 3, 32, 32)" in message


def test_the_wrapper_takes_the_edges_of_its_range_and_an_empty_batch():
    net, mean = ResNet(1).eval(), torch.full((3, 32, 32), 100.0)
    model = hubconf.ToTensorInput(net, mean)
    x = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    with torch.inference_mode():
        assert torch.equal(model(x), net(x * 255 - mean))
        assert model(torch.zeros(0, 3, 32, 32)).shape == (0, 10)


def test_the_wrapper_takes_any_float_precision_in_the_models_precision():
    # float64 is what numpy arrays give; .double() is what a user does to compare in float64.
    net, mean = ResNet(1).eval(), torch.full((3, 32, 32), 100.0)
    model = hubconf.ToTensorInput(net, mean)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        assert torch.equal(model(x.double()), model(x.double().float()))
        assert torch.allclose(model(x.double()), expected)
        assert torch.allclose(model(x.bfloat16()), model(x.bfloat16().float()))
        model.double()
        assert model(x).dtype == torch.float64 and torch.allclose(model(x).float(), expected,
                                                                   atol=1e-5)


def test_published_weights_load_without_posix_file_locks():
    # Windows has no fcntl: run.py's folder locks are not needed to load and check weights.
    code = ("import sys; sys.modules['fcntl'] = None; import torch; "
            f"m = torch.hub.load({ROOT!r}, 'resnet20', source='local', pretrained=True); "
            "print(tuple(m(torch.rand(1, 3, 32, 32)).shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "(1, 10)", done.stderr


def damaged_copy(name, tmp_path):
    """A copy of `name`'s published model.pt with the top exponent bit of one weight flipped,
    as a bad disk sector or a bad download does it: torch.load does not notice."""
    path = os.path.join(ROOT, hubconf.PUBLISHED[name])
    with open(path, "rb") as f:
        data = bytearray(f.read())
    weight = published_weights(name)["model"]["fc.weight"]
    raw = weight.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) == -1
    data[at + 3] ^= 0x40  # fc.weight[0, 0], little-endian float32: ~1e38 times larger
    copy = tmp_path / "model.pt"
    copy.write_bytes(bytes(data))
    damaged = torch.load(copy, map_location="cpu", weights_only=True)["model"]["fc.weight"]
    assert abs(damaged[0, 0]) > 1e30  # loads quietly, with a weight of 1e30 or more
    return copy


def without_digest(name, tmp_path):
    state = published_weights(name)
    state.pop("digest", None)
    copy = tmp_path / "model.pt"
    torch.save(state, copy)
    return copy


@pytest.mark.parametrize("damage", [damaged_copy, without_digest],
                         ids=["a flipped bit", "no digest"])
def test_published_weights_that_do_not_match_their_digest_are_refused_naming_the_file(
        damage, tmp_path, monkeypatch):
    copy = damage("resnet20", tmp_path)
    monkeypatch.setitem(hubconf.PUBLISHED, "resnet20", str(copy))  # an absolute path
    with pytest.raises(ValueError) as e:
        hubconf.resnet20(pretrained=True)
    assert str(copy) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", hubconf.PUBLISHED)
def test_hub_entry_gives_the_published_test_error_on_torchvision_style_images(real_cifar, name):
    model = hub_load(name, pretrained=True)
    images, labels = cifar_binary.load_split(real_cifar, "test")
    wrong = 0
    with torch.inference_mode():
        for start in range(0, len(images), 500):
            x = images[start:start + 500].float().div(255)  # transforms.ToTensor(), batched
            wrong += (model(x).argmax(1) != labels[start:start + 500]).sum().item()
    error = 100.0 * wrong / len(images)
    with open(os.path.join(published_folder(name), "test.json")) as f:
        published_error = json.load(f)["test_error"]
    # Published from bf16 evaluation; this is float32, as a hub user runs it (ResNet-20: 0.03
    # points apart).
    print(f"hub {name}, float32, ToTensor() inputs: {error:.2f}% (published {published_error}%)")
    assert error == pytest.approx(published_error, abs=0.1)
