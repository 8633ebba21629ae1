"""IQL's losses, networks and update step against hand-computed values and a plain sequential step."""

import copy
import math

import pytest
import torch

import iql


# ---- losses ---------------------------------------------------------------------------------------------
def test_expectile_loss_weights_positive_errors_by_tau():
    diff = torch.tensor([2.0, -1.0])  # u = Q - V
    # (0.7 * 2^2 + 0.3 * 1^2) / 2
    assert iql.expectile_loss(diff, 0.7).item() == pytest.approx(1.55)


def test_expectile_loss_at_one_half_is_half_the_mse():
    diff = torch.randn(100)
    assert iql.expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (diff**2).mean().item(), rel=1e-6)


def test_expectile_regression_converges_to_the_expectile():
    """Minimizing the loss over a constant v gives the tau-expectile: above the mean for tau > 0.5."""
    q = torch.tensor([0.0, 1.0, 2.0, 10.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.1)
    for _ in range(2000):
        opt.zero_grad()
        iql.expectile_loss(q - v, 0.9).backward()
        opt.step()
    # first-order condition: 0.9 * sum_{q>v}(q - v) = 0.1 * sum_{q<v}(v - q); solved by hand for v in (2, 10)
    # 0.9 (10 - v) = 0.1 (3v - 3)  ->  9 - 0.9v = 0.3v - 0.3  ->  v = 9.3 / 1.2
    assert v.item() == pytest.approx(9.3 / 1.2, abs=1e-3)


def test_awr_weights_are_exp_beta_advantage_clamped_at_max_weight():
    adv = torch.tensor([0.0, 1.0, -1.0, 10.0])
    w = iql.awr_weights(adv, beta=3.0, max_weight=100.0)  # the official code's clamp
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(3.0), math.exp(-3.0), 100.0]))


def test_awr_actor_loss_is_weighted_negative_log_likelihood():
    loss = iql.awr_actor_loss(torch.tensor([-1.0, -3.0]), torch.tensor([1.0, 2.0]))
    assert loss.item() == pytest.approx((1.0 * 1.0 + 2.0 * 3.0) / 2)


def test_td_loss_sums_the_two_critics_mse_against_r_plus_gamma_v_next():
    q = torch.tensor([[1.0, 0.0], [2.0, 0.5]])  # (critics, batch)
    rewards, dones, next_v = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 100.0])
    # targets: 1 + 0.9 * 2 = 2.8 ; 0.5 (terminal: no bootstrap)
    q1 = ((1.0 - 2.8) ** 2 + (0.0 - 0.5) ** 2) / 2
    q2 = ((2.0 - 2.8) ** 2 + (0.5 - 0.5) ** 2) / 2
    assert iql.td_loss(q, rewards, dones, next_v, 0.9).item() == pytest.approx(q1 + q2)


def test_gaussian_actor_log_prob_matches_torch_normal():
    actor = iql.Actor(3, 2, 16, 2, dropout=0.0, deterministic=False)
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([-0.5, 0.3]))
    obs, actions = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    ref = torch.distributions.Normal(actor(obs), actor.log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(actor.log_prob(obs, actions), ref)


def test_gaussian_actor_log_std_is_clamped_at_minus_five():
    actor = iql.Actor(3, 1, 8, 1, dropout=0.0, deterministic=False)
    with torch.no_grad():
        actor.log_std.fill_(-20.0)
    obs = torch.randn(1, 3)
    mean = actor(obs)
    ref = torch.distributions.Normal(mean, math.exp(-5.0)).log_prob(mean).sum(-1)
    torch.testing.assert_close(actor.log_prob(obs, mean), ref)


def test_deterministic_actor_log_prob_is_negative_squared_error():
    actor = iql.Actor(3, 2, 16, 2, dropout=0.0, deterministic=True)
    assert actor.log_std is None
    obs, actions = torch.randn(4, 3), torch.zeros(4, 2)
    torch.testing.assert_close(actor.log_prob(obs, actions), -(actor(obs) ** 2).sum(-1))


def test_actor_dropout_is_active_in_training_and_off_in_evaluation():
    obs = torch.randn(64, 3)
    actor = iql.Actor(3, 2, 64, 2, dropout=0.5, deterministic=False)
    actor.train()
    assert not torch.equal(actor(obs), actor(obs))
    actor.eval()
    assert torch.equal(actor(obs), actor(obs))
    no_dropout = iql.Actor(3, 2, 64, 2, dropout=0.0, deterministic=False)
    assert not any(isinstance(m, torch.nn.Dropout) for m in no_dropout.modules())


def test_twin_q_is_two_independent_critics_of_the_same_depth():
    critic = iql.TwinQ(3, 2, 16, 3, layer_norm=False)
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    q = critic(obs, act)
    assert q.shape == (2, 5) and not torch.allclose(q[0], q[1])
    x = torch.cat([obs, act], -1)
    for i in range(2):  # member i alone, written out as a plain MLP
        h = x
        linears = [m for m in critic.net if isinstance(m, iql.common.BatchedLinear)]
        for j, layer in enumerate(linears):
            h = h @ layer.weight[i] + layer.bias[i]
            h = torch.relu(h) if j < len(linears) - 1 else h
        torch.testing.assert_close(q[i], h.squeeze(-1))
    layer_norms = [m for m in iql.TwinQ(3, 2, 16, 3, layer_norm=True).net if isinstance(m, iql.common.BatchedLayerNorm)]
    assert len(layer_norms) == 3


# ---- the update step ------------------------------------------------------------------------------------
def build(**overrides):
    """A small IQL learner (hidden 16) as the script builds it, with fixed initial weights, and a fixed batch."""
    torch.manual_seed(0)
    args = iql.Args(hidden_dim=16, total_steps=4, **overrides)
    nets = iql.make_networks(args, 3, 2)
    opts = iql.make_optimizers(nets, args)
    batch = {
        "obs": torch.randn(64, 3),
        "actions": torch.rand(64, 2) * 2 - 1,
        "rewards": torch.randn(64),
        "next_obs": torch.randn(64, 3),
        "dones": (torch.rand(64) < 0.2).float(),
    }
    return nets, opts, iql.make_update(nets, opts, args), batch


def test_one_update_equals_a_hand_written_iql_step_in_the_official_order():
    """V step; actor step with A = min target Q - V_new(s); Q step with target r + gamma (1 - d) V_new(s');
    Polyak. Written out with plain Adam on copies of the same networks."""
    nets, _, update, batch = build(expectile=0.8, beta=2.0, tau=0.1)
    s, a, r, s2, d = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
    ref = copy.deepcopy(nets)
    adam = {k: torch.optim.Adam(ref[k].parameters(), lr=3e-4) for k in ("value", "actor", "critic")}
    q_target = torch.minimum(*ref["target_critic"](s, a)).detach()
    u = q_target - ref["value"](s).squeeze(-1)
    v_loss = (torch.where(u > 0, 0.8, 0.2) * u**2).mean()
    adam["value"].zero_grad(), v_loss.backward(), adam["value"].step()
    with torch.no_grad():
        v, v_next = ref["value"](s).squeeze(-1), ref["value"](s2).squeeze(-1)
    std = ref["actor"].log_std.clamp(-5, 2).exp()
    log_prob = torch.distributions.Normal(ref["actor"](s), std).log_prob(a).sum(-1)
    actor_loss = -(torch.clamp(torch.exp(2.0 * (q_target - v)), max=100.0) * log_prob).mean()
    adam["actor"].zero_grad(), actor_loss.backward(), adam["actor"].step()
    q1, q2 = ref["critic"](s, a)
    y = r + 0.99 * (1 - d) * v_next
    critic_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    adam["critic"].zero_grad(), critic_loss.backward(), adam["critic"].step()
    for p_t, p in zip(ref["target_critic"].parameters(), ref["critic"].parameters(), strict=True):
        p_t.data = 0.9 * p_t.data + 0.1 * p.data

    metrics = update(batch, 1)
    torch.testing.assert_close(metrics["losses/value_loss"], v_loss.detach())
    torch.testing.assert_close(metrics["losses/actor_loss"], actor_loss.detach())
    torch.testing.assert_close(metrics["losses/critic_loss"], critic_loss.detach())
    for name in nets:
        for (key, p), p_ref in zip(nets[name].state_dict().items(), ref[name].state_dict().values(), strict=True):
            torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_compiled_update_equals_eager_follows_the_cosine_schedule_and_never_recompiles():
    from torch._dynamo.utils import counters

    nets, opts, eager, batch = build()
    compiled_nets, compiled_opts, compiled, _ = build(compile=True)
    lrs = [float(compiled_opts["actor_opt"].param_groups[0]["lr"])]
    before = counters["stats"]["unique_graphs"]
    for step in range(4):  # T = 4 steps: lr 3e-4 * (1 + cos(pi t / T)) / 2
        m_eager, m_compiled = eager(batch, step + 1), compiled(batch, step + 1)
        lrs.append(float(compiled_opts["actor_opt"].param_groups[0]["lr"]))
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # really compiled, not a silent fallback to eager
    assert counters["stats"]["unique_graphs"] == graphs  # a changing learning rate must not recompile
    assert lrs[0] == pytest.approx(3e-4) and lrs[2] == pytest.approx(1.5e-4) and lrs[4] == pytest.approx(0.0, abs=1e-12)
    for k in m_eager:
        torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-5, atol=1e-6)
    for name in nets:
        for p, q in zip(nets[name].parameters(), compiled_nets[name].parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_default_init_is_pytorchs_and_orthogonal_init_has_gain_sqrt2_on_every_layer(orthogonal):
    """Default: PyTorch's nn.Linear init, weights and biases uniform in +-1/sqrt(fan_in) (CORL); --orthogonal-init:
    the official code's orthogonal weights with gain sqrt 2 on every layer, output layers included, zero biases."""
    nets, *_ = build(orthogonal_init=orthogonal)
    for name in ("actor", "critic", "value"):
        layers = [m for m in nets[name].modules() if hasattr(m, "weight") and m.weight.dim() >= 2]
        assert len(layers) == 3, name  # 2 hidden + output
        for layer in layers:
            bias, fan_in = layer.bias.detach(), layer.weight.shape[-1 if isinstance(layer, torch.nn.Linear) else -2]
            for w in layer.weight.detach().view(-1, *layer.weight.shape[-2:]):
                if orthogonal:
                    w = w if w.shape[0] >= w.shape[1] else w.T  # columns orthonormal up to the gain
                    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(w.shape[1]), atol=1e-5, rtol=0)
                else:  # uniform in +-1/sqrt(fan_in): its std is 1/sqrt(3 fan_in)
                    assert w.abs().max() <= fan_in**-0.5 and w.std() == pytest.approx((3 * fan_in) ** -0.5, rel=0.3)
            assert (bias == 0).all() if orthogonal else (bias.abs().max() <= fan_in**-0.5 and (bias != 0).any())


BF16_ADVANTAGE_TOLERANCE = 0.05  # |A_bf16 - A_fp32| at Q, V ~ 100; bf16's spacing at 100 is 0.5


def test_bf16_keeps_advantages_and_awr_weights_close_to_float32_at_realistic_magnitudes():
    """Q and V around 100 (IQL after the locomotion scaling): with float32 output layers the advantage keeps
    float32 resolution; rounding Q and V to bfloat16 (the defect this guards against) would not."""
    nets, _, _, batch = build()
    s, a = batch["obs"], batch["actions"]
    with torch.no_grad():
        for net in (nets["target_critic"], nets["value"]):
            list(net.modules())[-1].bias.fill_(100.0)

    def advantage(bf16: bool):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return nets["target_critic"](s, a).min(dim=0).values - nets["value"](s).squeeze(-1)

    exact, fast = advantage(False), advantage(True)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # bf16 hidden layers really ran
    assert (fast - exact).abs().max() < BF16_ADVANTAGE_TOLERANCE
    ratio = iql.awr_weights(fast, 10.0, 100.0) / iql.awr_weights(exact, 10.0, 100.0)
    assert ratio.min() > 0.6 and ratio.max() < 1.65  # exp(10 * 0.05)
    with torch.no_grad():  # the same outputs rounded to bfloat16 after the fact miss the tolerance
        q, v = nets["target_critic"](s, a).min(dim=0).values, nets["value"](s).squeeze(-1)
    rounded = q.bfloat16().float() - v.bfloat16().float()
    assert (rounded - exact).abs().max() > BF16_ADVANTAGE_TOLERANCE


def test_bf16_update_stays_close_to_float32():
    *_, fp32, batch = build()
    *_, bf16, _ = build(bf16=True)
    m32, m16 = fp32(batch, 1), bf16(batch, 1)
    assert m16["losses/critic_loss"].item() != m32["losses/critic_loss"].item()  # bf16 really ran
    for k in ("losses/value_loss", "losses/critic_loss", "losses/actor_loss", "losses/q_mean"):
        assert m16[k].dtype == torch.float32
        rel = abs(m16[k].item() - m32[k].item()) / max(abs(m32[k].item()), 1e-3)
        assert rel < 0.02, (k, m16[k].item(), m32[k].item())
