"""hubconf.py through torch.hub.load(source="local") on this checkout: every depth of the
paper, the published weights behind a wrapper that takes transforms.ToTensor() images, and a
clear error for nets without published weights."""
import json
import os

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
