"""The ContextUNet: shapes, supported sizes, conditioning and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from fiberaug.errors import UserError
from fiberaug.nets import ContextUNet


def _net(**kwargs) -> ContextUNet:
    torch.manual_seed(0)
    net = ContextUNet(**{"channels": 3, "image_size": 16, "num_classes": 4, "base_channels": 8, **kwargs})
    for p in net.parameters():  # leave the zero-initialised outputs, so every input matters
        torch.nn.init.normal_(p, std=0.05)
    return net


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 16), (3, 24), (1, 12)])
def test_output_matches_input_shape(channels, size):
    net = ContextUNet(channels=channels, image_size=size, num_classes=0, base_channels=8, channel_mults=(1, 2, 2))
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([3, 700])).shape == x.shape


@pytest.mark.parametrize("size", [6, 10, 4])
def test_unsupported_sizes_are_refused(size):
    message = rf"data.image_size={size} does not fit ContextUNet .* multiples of 4 from 8 up"
    with pytest.raises(UserError, match=message):
        ContextUNet(channels=1, image_size=size, channel_mults=(1, 2, 2))


def test_parameters_are_fixed_by_construction():
    net = _net(base_channels=8, channel_mults=(1, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_time_and_class_change_the_prediction():
    net = _net().eval()
    x = torch.randn(1, 3, 16, 16)
    base = net(x, torch.tensor([10]), torch.tensor([1]))
    assert not torch.allclose(base, net(x, torch.tensor([900]), torch.tensor([1])))
    assert not torch.allclose(base, net(x, torch.tensor([10]), torch.tensor([2])))
    # No labels means the "no label" token.
    assert torch.equal(net(x, torch.tensor([10]), None), net(x, torch.tensor([10]), torch.tensor([4])))


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 500]), torch.tensor([0, 3])
    grads = []
    for checkpointing in (False, True):
        net = _net()
        if checkpointing:
            net.enable_gradient_checkpointing()
        net(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _weights_used(output: torch.Tensor) -> set[int]:
    """The ids of every leaf tensor with requires_grad that the autograd graph of `output` reaches."""
    seen, leaves, todo = set(), set(), [output.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def test_every_weight_the_forward_pass_uses_is_a_trained_parameter():
    """The prototype built a fresh 1×1 skip convolution inside `forward`: untrained, and different at every call."""
    net = _net(base_channels=8, channel_mults=(1, 2, 2)).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 600]), torch.tensor([0, 2])
    out = net(x, t, y)
    assert _weights_used(out) == {id(p) for p in net.parameters()}
    assert torch.equal(out, net(x, t, y))
