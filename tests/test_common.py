import random

import numpy as np
import torch
import torch.nn as nn

from common import (
    BatchedLayerNorm,
    BatchedLinear,
    BatchedOutputLinear,
    OutputLinear,
    get_rng_states,
    orthogonal_init,
    save_checkpoint,
    set_rng_states,
    soft_update,
)


def test_batched_linear_equals_separate_layers():
    layer = BatchedLinear(3, 5, 4)
    x = torch.randn(7, 5)
    out = layer(x)  # a 2-D input is shared by every member
    assert out.shape == (3, 7, 4)
    for i in range(3):
        expected = x @ layer.weight[i] + layer.bias[i]
        torch.testing.assert_close(out[i], expected)
    xs = torch.randn(3, 7, 5)  # a 3-D input gives each member its own batch
    torch.testing.assert_close(layer(xs)[1], xs[1] @ layer.weight[1] + layer.bias[1])


def test_batched_layer_norm_has_separate_affine_parameters_per_member():
    ln = BatchedLayerNorm(2, 4)
    with torch.no_grad():
        ln.weight[1].fill_(2.0)
        ln.bias[1].fill_(1.0)
    x = torch.randn(2, 3, 4)
    ref = nn.functional.layer_norm(x, (4,))
    torch.testing.assert_close(ln(x)[0], ref[0])
    torch.testing.assert_close(ln(x)[1], ref[1] * 2.0 + 1.0)


def test_orthogonal_init_makes_each_member_orthogonal_with_gain_sqrt2_and_zero_bias():
    net = nn.Sequential(nn.Linear(6, 6), BatchedLinear(2, 6, 6))
    orthogonal_init(net)
    w = net[0].weight
    torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(6), atol=1e-5, rtol=0)
    for member in net[1].weight:
        torch.testing.assert_close(member.T @ member, 2.0 * torch.eye(6), atol=1e-5, rtol=0)
    assert not net[0].bias.any() and not net[1].bias.any()
    assert not torch.equal(net[1].weight[0], net[1].weight[1])  # members are initialised independently


def test_soft_update_moves_target_by_tau():
    source, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in target.parameters()]
    soft_update(target, source, 0.25)
    for t, s, b in zip(target.parameters(), source.parameters(), before, strict=True):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)


def test_rng_states_round_trip_every_stream():
    gen = torch.Generator().manual_seed(0)
    states = get_rng_states(gen)
    draws = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    set_rng_states(states, gen)
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    assert draws == again


def test_output_layers_compute_in_float32_under_bf16_autocast():
    x = torch.randn(5, 8)
    for layer in (OutputLinear(8, 3), BatchedOutputLinear(2, 8, 3)):
        with torch.no_grad():
            layer.bias.fill_(100.0)  # Q ~ 100, where bfloat16's spacing is 0.5
            exact = layer(x)
            with torch.autocast("cpu", torch.bfloat16):
                fast = layer(x)
        assert fast.dtype == torch.float32
        torch.testing.assert_close(fast, exact, rtol=0, atol=0)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # a plain layer would round to bfloat16
        assert nn.Linear(8, 3)(x).dtype == torch.bfloat16


def test_save_checkpoint_writes_step_and_last_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {"step": step}, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_2.pt", "step_3.pt"]
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True) == {"step": 3}
