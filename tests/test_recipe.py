"""The paper's recipe as training applies it, observed where it acts: the lr each step runs at,
what SGD is given, what the network sees, which images the mean comes from, eval mode, and
where layer responses are taken. Each test fails on one plausible slip in run.py (or in
resnet.py's batch norm)."""
import itertools
import json
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cifar_binary
import plot_curves
import run
from resnet import LayerResponses, ResNet
from test_run import checkpoint_of, few_test_images, sigterm_after, train


@pytest.fixture(autouse=True)
def quick_evaluations():
    """These tests look at training; its evaluations need not cover the whole test set."""
    with few_test_images():
        yield


@pytest.fixture
def steps(monkeypatch):
    """Every training step's optimizer hyper-parameters, as SGD sees them during the step."""
    seen, real_step = [], run.train_step

    def recording_step(model, optimizer, *args, **kwargs):
        seen.append(dict(optimizer.param_groups[0], params=None))
        return real_step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(run, "train_step", recording_step)
    return seen


def test_the_lr_drops_at_the_milestone_iteration_itself(synthetic_cifar, tmp_path, steps):
    assert train(synthetic_cifar, tmp_path, "--milestones", "5", "9") == 0
    lrs = [round(step["lr"], 9) for step in steps]
    assert lrs == [0.1] * 5 + [0.01] * 4 + [0.001] * 3  # iterations 0-4, 5-8, 9-11


def test_resume_after_warmup_keeps_the_schedules_lr(synthetic_cifar, tmp_path, steps,
                                                    monkeypatch):
    # Random labels keep the training error near 90%: the cap ends the warm-up, here at the
    # first window (iteration 4) instead of 2,000. Both runs stop early: no evaluation.
    monkeypatch.setattr(run, "WARMUP_WINDOW", 4)
    monkeypatch.setattr(run, "WARMUP_MAX_ITERS", 4)
    folder = tmp_path / "resnet8-iters12-warmup-on"
    with sigterm_after(5):
        assert train(synthetic_cifar, tmp_path, "--warmup", "on") == 128 + signal.SIGTERM
    stopped = checkpoint_of(folder)
    assert (stopped["iteration"], stopped["warmup_end"]) == (5, 4)
    with sigterm_after(2):  # iterations 5 and 6
        assert train(synthetic_cifar, tmp_path, "--warmup", "on") == 128 + signal.SIGTERM
    lrs = [round(step["lr"], 9) for step in steps]
    assert lrs == [0.01] * 4 + [0.1] * 2 + [0.01]  # 0-3 warm-up; 4 and 5 (resumed) 0.1; /10 at 6
    assert checkpoint_of(folder)["warmup_end"] == 4


@pytest.mark.parametrize("log_every", ["1", "5", "50"])
def test_the_warmup_ends_on_its_own_window_whatever_log_every_is(synthetic_cifar, tmp_path,
                                                                 steps, monkeypatch, log_every):
    monkeypatch.setattr(run, "WARMUP_WINDOW", 2)
    monkeypatch.setattr(run, "WARMUP_MAX_ITERS", 6)  # random labels: the cap ends it
    with sigterm_after(8):  # no evaluation
        assert train(synthetic_cifar, tmp_path, "--warmup", "on", "--log-every", log_every,
                     "--milestones", "7", "9") == 128 + signal.SIGTERM
    assert [round(step["lr"], 9) for step in steps] == [0.01] * 6 + [0.1] + [0.01]
    assert checkpoint_of(tmp_path / "resnet8-iters12-ms7-9-warmup-on")["warmup_end"] == 6


def test_sgd_is_given_the_recipes_momentum_and_weight_decay(synthetic_cifar, tmp_path, steps):
    assert train(synthetic_cifar, tmp_path / "paper") == 0
    assert {(s["momentum"], s["weight_decay"], s["dampening"], s["nesterov"]) for s in steps} \
        == {(0.9, 1e-4, 0, False)}
    steps.clear()
    assert train(synthetic_cifar, tmp_path / "other", "--weight-decay", "0.003",
                 "--momentum", "0.5") == 0
    assert {(s["momentum"], s["weight_decay"]) for s in steps} == {(0.5, 0.003)}


class Recorder(nn.Module):
    """A linear classifier that keeps the inputs it was given."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.fc(x.flatten(1))


def one_step(images, mean, seed=0):
    model = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(images)) % 10
    run.train_step(model, optimizer, images, labels, mean, generator, "none")
    return model.inputs[0]


def test_the_padding_is_black_before_the_mean_is_subtracted():
    images = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    x = one_step(images, torch.full((3, 32, 32), 100.0))
    assert set(x.unique().tolist()) == {100.0, -100.0}  # image pixels, padding: 0 - mean


def test_the_network_trains_on_cropped_and_flipped_images():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    mean = cifar_binary.per_pixel_mean(images)
    x = one_step(images, mean, seed=7)
    expected = cifar_binary.augment(images, torch.Generator().manual_seed(7))
    assert torch.equal(x, cifar_binary.normalize(expected, mean))
    unchanged = (x == cifar_binary.normalize(images, mean)).flatten(1).all(1)
    assert unchanged.float().mean() < 0.2  # only the uncropped, unflipped draws: 1/81 x 1/2


def test_each_iteration_draws_its_own_augmentation(synthetic_cifar, tmp_path, monkeypatch):
    """The crops and flips each step draws, shown on one fixed batch of images."""
    probe = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    draws, real_step = [], run.train_step

    def recording_step(model, optimizer, images, labels, mean, generator, *args, **kwargs):
        same_draws = torch.Generator()
        same_draws.set_state(generator.get_state())
        draws.append(cifar_binary.augment(probe, same_draws))
        return real_step(model, optimizer, images, labels, mean, generator, *args, **kwargs)

    monkeypatch.setattr(run, "train_step", recording_step)
    with sigterm_after(4):  # four steps are enough: stopped there, without an evaluation
        assert train(synthetic_cifar, tmp_path) == 128 + signal.SIGTERM
    assert len(draws) == 4
    same = [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(draws), 2)
            if torch.equal(a, b)]
    assert same == []  # pairs of iterations that drew the same crops and flips


def test_the_per_pixel_mean_is_that_of_the_training_images_in_use(synthetic_cifar, tmp_path):
    assert train(synthetic_cifar, tmp_path, "--val-size", "1000") == 0
    saved = checkpoint_of(tmp_path / "resnet8-iters12-val1000")["per_pixel_mean"]
    images, _ = cifar_binary.load_split(synthetic_cifar, "train")
    test_images, _ = cifar_binary.load_split(synthetic_cifar, "test")
    assert torch.equal(saved, cifar_binary.per_pixel_mean(images[:49_000]))
    assert not torch.equal(saved, cifar_binary.per_pixel_mean(images))
    assert not torch.equal(saved, cifar_binary.per_pixel_mean(test_images))


def test_a_resume_mid_window_keeps_the_windows_running_average(synthetic_cifar, tmp_path):
    with sigterm_after(6):  # --log-every 4: iterations 5 and 6 are in the stopped window
        assert train(synthetic_cifar, tmp_path / "stopped") == 128 + signal.SIGTERM
    assert train(synthetic_cifar, tmp_path / "stopped") == 0
    assert train(synthetic_cifar, tmp_path / "once") == 0
    resumed, once = (plot_curves.load_scalars(str(tmp_path / kind / "resnet8-iters12"))
                     for kind in ("stopped", "once"))
    for tag in ("train/loss", "train/error"):
        assert resumed[tag] == once[tag], tag


def test_evaluation_runs_the_network_in_eval_mode_and_restores_train_mode():
    model = ResNet(1).train()
    modes = []
    model.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    run.evaluate(model, images, torch.arange(300) % 10, torch.zeros(3, 32, 32), "none")
    assert modes and not any(modes)
    assert model.training


def test_eval_loss_is_per_image_with_a_partial_last_batch():
    torch.manual_seed(0)
    model = ResNet(1).eval()
    images = torch.randint(0, 256, (130, 3, 32, 32), dtype=torch.uint8)  # CPU batches: 128 + 2
    labels = torch.arange(130) % 10
    mean = cifar_binary.per_pixel_mean(images)
    result = run.evaluate(model, images, labels, mean, "none")
    with torch.no_grad():
        expected = F.cross_entropy(model(cifar_binary.normalize(images, mean)), labels).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-4)


class Answers(nn.Module):
    """A classifier whose answer is written in each image: its first pixel's value."""

    def forward(self, x):
        return F.one_hot(x[:, 0, 0, 0].long(), 10).float()


def test_per_class_error_counts_each_class():
    # (class, images, wrong answers); classes 4-9 have no image
    classes = [(0, 4, 1), (1, 20, 2), (2, 5, 5), (3, 1, 0)]
    labels, answers = [], []
    for label, count, wrong in classes:
        labels += [label] * count
        answers += [(label + 1) % 10] * wrong + [label] * (count - wrong)
    images = torch.tensor(answers, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32)
    result = run.evaluate(Answers(), images, torch.tensor(labels), torch.zeros(3, 32, 32), "none")
    assert result["per_class_error"] == pytest.approx([25.0, 10.0, 100.0, 0.0] + [0.0] * 6)
    assert result["error"] == pytest.approx(100.0 * 8 / 30)


def test_batchnorm_keeps_torchs_default_momentum():
    """Running statistics move 10% of the way to each training batch's (torch's default)."""
    torch.manual_seed(0)
    model = ResNet(1, shortcut="B").train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    inputs = {}
    for bn in bns:
        bn.register_forward_pre_hook(lambda module, args: inputs.__setitem__(module, args[0]))
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    assert len(inputs) == len(bns) == 1 + 2 * 3 + 2  # two projections
    for bn in bns:
        x = inputs[bn]
        torch.testing.assert_close(bn.running_mean, 0.1 * x.mean((0, 2, 3)))
        torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * x.var((0, 2, 3)))
        assert bn.momentum == 0.1


def test_layer_responses_are_taken_after_batch_norm():
    torch.manual_seed(0)
    model = ResNet(1).eval()
    bns = [model.bn1] + [bn for block in model.blocks for bn in (block.bn1, block.bn2)]
    for bn in bns:  # batch norm that changes the scale: before and after it differ
        bn.weight.data.uniform_(2, 3)
        bn.running_var.uniform_(0.5, 2)
    outputs = []
    for bn in bns:
        bn.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), LayerResponses(model) as responses:
        model(x)
    expected = [out.double().std(unbiased=False).item() for out in outputs]
    assert responses.std() == pytest.approx(expected, rel=1e-5)
