"""The CIFAR-10 networks of He et al. 2015, Section 4.2 (resnet.py): sizes, wiring, init,
serialisation and the layer-response probe of Figure 7."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cifar_binary
import experiment
import resnet
from resnet import LayerResponses, ResNet, ZeroPadShortcut, count_parameters, response_layers

# The table of Section 4.2 / the module docstring; option A, residual == plain.
PAPER_PARAMS = {3: 269_722, 5: 464_154, 7: 658_586, 9: 853_018, 18: 1_727_962, 200: 19_421_274}
# Option B adds a 1x1 conv + BN at each of the two places the dimensions grow:
# 16*32 + 2*32 + 32*64 + 2*64 (no params where dimensions do not grow).
PROJECTION_PARAMS = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forward passes: a second intra-op thread only fights the other work on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(n, **kw):
    torch.manual_seed(0)
    return ResNet(n, **kw)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def manual_forward(model, x):
    """The residual/plain forward written out by hand; also returns the 6n+1 BN outputs."""
    responses = []
    out = model.bn1(model.conv1(x))
    responses.append(out)
    out = F.relu(out)
    for block in model.blocks:
        a = block.bn1(block.conv1(out))
        b = block.bn2(block.conv2(F.relu(a)))
        responses += [a, b]
        out = F.relu(b if block.shortcut is None else b + block.shortcut(out))
    logits = model.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
    return logits, responses


# --- sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", sorted(PAPER_PARAMS))
def test_parameter_count_matches_paper_table_for_residual_and_plain(n):
    assert count_parameters(ResNet(n)) == PAPER_PARAMS[n]
    assert count_parameters(ResNet(n, plain=True)) == PAPER_PARAMS[n]


@pytest.mark.parametrize("n", [3, 9])
def test_option_b_adds_exactly_two_projections(n):
    assert count_parameters(ResNet(n, shortcut="B")) == PAPER_PARAMS[n] + PROJECTION_PARAMS


@pytest.mark.parametrize("n", [1, 3, 9, 18])
def test_torch_free_parameter_count_is_the_models(n):
    for kw in ({}, {"plain": True}, {"shortcut": "B"}, {"plain": True, "shortcut": "B"},
               {"num_classes": 100}):
        assert experiment.parameter_count(n, **kw) == count_parameters(ResNet(n, **kw)), kw


def test_torch_free_parameter_count_gives_the_papers_table():
    assert {n: experiment.parameter_count(n) for n in PAPER_PARAMS} == PAPER_PARAMS
    assert {n: experiment.parameter_count(n, plain=True) for n in PAPER_PARAMS} == PAPER_PARAMS


def test_torch_free_class_counts_are_the_data_sets():
    assert experiment.NUM_CLASSES == {name: dataset.num_classes
                                      for name, dataset in cifar_binary.DATASETS.items()}


@pytest.mark.parametrize("n", [1, 3])
def test_shortcut_kinds_per_block(n):
    growing = {n, 2 * n}
    for i, block in enumerate(ResNet(n).blocks):
        kind = ZeroPadShortcut if i in growing else nn.Identity
        assert type(block.shortcut) is kind
        assert not list(block.shortcut.parameters())
    for i, block in enumerate(ResNet(n, shortcut="B").blocks):
        if i in growing:
            conv, bn = block.shortcut
            assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
            assert conv.stride == (2, 2) and conv.bias is None
            assert isinstance(bn, nn.BatchNorm2d)
        else:
            assert type(block.shortcut) is nn.Identity
    assert all(block.shortcut is None for block in ResNet(n, plain=True).blocks)


@pytest.mark.parametrize("n,kw", [(1, {}), (2, {"plain": True}), (2, {"shortcut": "B"})])
def test_main_path_has_6n_plus_2_weighted_layers(n, kw):
    model = ResNet(n, **kw)
    assert model.depth == 6 * n + 2
    called = []
    handles = [m.register_forward_hook(lambda m, i, o, name=name: called.append(name))
               for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and ".shortcut" not in name]
    model(images())
    for h in handles:
        h.remove()
    assert len(called) == 6 * n + 2
    assert len(set(called)) == len(called)  # each weighted layer once


@pytest.mark.parametrize("kw", [{}, {"plain": True}, {"shortcut": "B"}])
def test_feature_maps_are_16_32_64_filters_on_32_16_8_maps(kw):
    n, batch = 2, 3
    model = ResNet(n, **kw)
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, resnet.Block))]
    out = model(images(batch))
    for h in hooks:
        h.remove()
    assert out.shape == (batch, 10)
    assert shapes["conv1"] == (batch, 16, 32, 32)
    expected = [(16, 32)] * n + [(32, 16)] * n + [(64, 8)] * n
    for i, (channels, size) in enumerate(expected):
        for name in (f"blocks.{i}", f"blocks.{i}.conv1", f"blocks.{i}.conv2"):
            assert shapes[name] == (batch, channels, size, size), name


def test_stride_two_only_in_first_conv_of_stages_two_and_three():
    n = 3
    model = ResNet(n)
    assert model.conv1.stride == (1, 1)
    for i, block in enumerate(model.blocks):
        assert block.conv1.stride == ((2, 2) if i in (n, 2 * n) else (1, 1))
        assert block.conv2.stride == (1, 1)


@pytest.mark.parametrize("kw", [{}, {"plain": True}, {"shortcut": "B"}])
def test_convs_are_3x3_without_bias_except_projections(kw):
    for name, m in ResNet(2, **kw).named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is None, name
            assert m.kernel_size == ((1, 1) if ".shortcut" in name else (3, 3)), name


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="n must be"):
        ResNet(0)
    with pytest.raises(ValueError, match="shortcut"):
        ResNet(1, shortcut="C")


# --- shortcuts ---------------------------------------------------------------------------

def test_zero_pad_shortcut_subsamples_and_appends_zero_channels():
    x = torch.randn(2, 16, 32, 32) + 5  # no zeros in x
    shortcut = ZeroPadShortcut(16, 32, 2)
    out = shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.equal(out[:, 16:], torch.zeros(2, 16, 16, 16))
    assert not list(shortcut.parameters())


def zero_second_bn(model):
    with torch.no_grad():
        for block in model.blocks:
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
    return model


def test_residual_block_with_zeroed_residual_passes_its_input_through():
    # Each block then outputs relu(shortcut(x)) = shortcut(x) for x >= 0, so the stack of
    # blocks reduces to the two option-A subsampling + zero-padding steps.
    model = zero_second_bn(seeded(2)).eval()
    x = images(4)
    stem = F.relu(model.bn1(model.conv1(x)))
    out = model.blocks(stem)
    assert out.shape == (4, 64, 8, 8)
    assert torch.equal(out[:, :16], stem[:, :, ::4, ::4])
    assert torch.equal(out[:, 16:], torch.zeros(4, 48, 8, 8))
    assert out.abs().sum() > 0


def test_plain_block_with_zeroed_second_bn_outputs_zeros():
    model = zero_second_bn(seeded(2, plain=True)).eval()
    x = images(4)
    stem = F.relu(model.bn1(model.conv1(x)))
    assert stem.abs().sum() > 0
    assert torch.equal(model.blocks(stem), torch.zeros(4, 64, 8, 8))
    # so every input gets the same logits: the fc bias
    assert torch.allclose(model(x), model.fc.bias.expand(4, 10))


def test_manual_forward_matches_model_for_all_variants():
    for kw in ({}, {"plain": True}, {"shortcut": "B"}):
        model = seeded(2, **kw).eval()
        x = images(3)
        assert torch.allclose(model(x), manual_forward(model, x)[0], atol=1e-6)


# --- initialisation ----------------------------------------------------------------------

def fan_out(conv):
    return conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]


def conv_weights_he_fan_out(model):
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().double()
            target = math.sqrt(2 / fan_out(m))
            tolerance = 5 / math.sqrt(2 * w.numel())  # ~5 standard errors of a sample std
            assert abs(w.std().item() / target - 1) < tolerance, name
            assert abs(w.mean().item()) < 5 * target / math.sqrt(w.numel()), name
            checked += 1
    return checked


def test_conv_init_is_he_normal_fan_out():
    assert conv_weights_he_fan_out(seeded(3)) == 6 * 3 + 1
    assert conv_weights_he_fan_out(seeded(3, shortcut="B")) == 6 * 3 + 3


def test_conv_init_uses_fan_out_not_fan_in():
    # 32 -> 64 channels: fan_out = 576, fan_in = 288, so the two stds differ by sqrt(2).
    w = seeded(3).blocks[6].conv1.weight.detach().double()
    assert w.shape == (64, 32, 3, 3)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.03)


def test_conv_init_is_normal_not_uniform():
    # standardised weights of all convs: kurtosis 3 for a normal, 1.8 for a uniform
    model = seeded(5)
    z = torch.cat([m.weight.detach().double().flatten() / math.sqrt(2 / fan_out(m))
                   for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert z.std().item() == pytest.approx(1, abs=0.02)
    assert (z ** 4).mean().item() / z.var().item() ** 2 == pytest.approx(3, abs=0.2)


def test_batch_norms_start_at_weight_one_bias_zero():
    bns = [m for m in seeded(2, shortcut="B").modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 * 2 + 1 + 2
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


# --- serialisation and module order ------------------------------------------------------

def test_whole_model_survives_torch_save_and_load(tmp_path):
    model = seeded(1, shortcut="B").eval()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False).eval()
    assert type(loaded) is ResNet and loaded.depth == 8 and loaded.shortcut == "B"
    x = images(2)
    assert torch.equal(loaded(x), model(x))


def test_deepcopy_is_independent_and_equal():
    model = seeded(1).eval()
    clone = copy.deepcopy(model)
    x = images(2)
    assert torch.equal(clone(x), model(x))
    with torch.no_grad():
        clone.fc.bias.add_(1)
    assert not torch.equal(clone(x), model(x))


@pytest.mark.parametrize("kw", [{}, {"plain": True}, {"shortcut": "B"}])
def test_modules_are_registered_in_forward_order(kw):
    model = ResNet(2, **kw)
    leaves = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    called = []
    handles = [m.register_forward_hook(lambda m, i, o, name=name: called.append(name))
               for name, m in leaves]
    model(images())
    for h in handles:
        h.remove()
    assert called == [name for name, _ in leaves]


# --- layer responses (Figure 7) ----------------------------------------------------------

@pytest.mark.parametrize("n,kw", [(1, {}), (2, {"plain": True}), (2, {"shortcut": "B"})])
def test_response_layers_are_the_6n_plus_1_conv_bns_in_network_order(n, kw):
    model = ResNet(n, **kw)
    layers = response_layers(model)
    assert len(layers) == 6 * n + 1
    assert all(isinstance(layer, nn.BatchNorm2d) for layer in layers)
    order = []
    handles = [layer.register_forward_hook(lambda m, i, o, k=k: order.append(k))
               for k, layer in enumerate(layers)]
    model(images())
    for h in handles:
        h.remove()
    assert order == list(range(6 * n + 1))
    projection_bns = {id(m) for name, m in model.named_modules() if ".shortcut" in name}
    assert not projection_bns & {id(layer) for layer in layers}


@pytest.mark.parametrize("kw", [{}, {"plain": True}])
def test_layer_response_std_matches_direct_computation_over_batches(kw):
    model = seeded(1, **kw).eval()
    batches = [images(3, seed=2), images(5, seed=3) * 2]
    with torch.no_grad(), LayerResponses(model) as responses:
        for x in batches:
            model(x)
    per_batch = [manual_forward(model, x)[1] for x in batches]
    expected = [torch.cat([r[k].flatten() for r in per_batch]).double().std(unbiased=False).item()
                for k in range(len(per_batch[0]))]
    got = responses.std()
    assert len(got) == 6 * 1 + 1
    assert got == pytest.approx(expected, rel=1e-5)
    assert len({round(s, 4) for s in expected}) > 1  # the comparison is not between constants


def test_layer_responses_leave_output_unchanged_and_remove_their_hooks():
    model = seeded(1).eval()
    x = images(2)
    before = model(x)
    with LayerResponses(model) as responses:
        assert all(len(layer._forward_hooks) == 1 for layer in response_layers(model))
        during = model(x)
    assert torch.equal(before, during)
    assert all(not layer._forward_hooks for layer in response_layers(model))
    std = responses.std()
    model(x)  # not recorded any more
    assert responses.std() == std


def test_layer_responses_remove_hooks_when_the_block_raises():
    model = seeded(1)
    with pytest.raises(RuntimeError, match="boom"):
        with LayerResponses(model):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in response_layers(model))


# --- batch norm over groups of images (bn_batch) ------------------------------------------

def test_bn_batch_normalises_each_group_alone_and_keeps_the_first_groups_statistics():
    grouped = seeded(1, bn_batch=16)
    halves = [copy.deepcopy(seeded(1)) for _ in range(2)]  # two "GPUs" of 16 images each
    x = images(32)
    out = grouped(x)
    reference = torch.cat([net(part) for net, part in zip(halves, x.split(16))])
    assert torch.allclose(out, reference, atol=1e-5)
    for key, value in grouped.state_dict().items():  # running statistics: the first group's
        assert torch.equal(value, halves[0].state_dict()[key]), key
    out.square().sum().backward()
    reference.square().sum().backward()
    for p, a, b in zip(grouped.parameters(), *(net.parameters() for net in halves)):
        assert torch.allclose(p.grad, a.grad + b.grad, rtol=1e-4, atol=1e-4)
    whole = seeded(1)
    whole(x)
    assert not torch.equal(whole.bn1.running_var, grouped.bn1.running_var)


def test_bn_batch_changes_nothing_in_eval_mode_or_at_the_whole_batch():
    x = images(32)
    grouped, plain_bn = seeded(1, bn_batch=16).eval(), seeded(1).eval()
    assert torch.equal(grouped(x), plain_bn(x))
    grouped, plain_bn = seeded(1, bn_batch=32), seeded(1)
    assert torch.equal(grouped(x), plain_bn(x))
    assert all(isinstance(m, nn.BatchNorm2d) for m in response_layers(grouped))
    with pytest.raises(ValueError, match="groups of 32"):
        grouped(images(48))
