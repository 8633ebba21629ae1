"""EDAC is SAC-N plus one term: the diversity term against hand-computed values and a plain loop over pairs of critics;
the update step against CORL's EDAC written out with N separate critics (test_sac_n.py's reference step, each critic's
action gradient taken on its own, the pairs looped over); with eta 0 it is sac_n.py's step; the settings tables
against CORL's configs; compiled and bf16 variants; out-of-range values refused."""

import math

import pytest
import torch
from conftest import assert_bf16_close, assert_compiled_equals_eager, assert_invalid, compiled_and_eager_updates
from test_sac_n import ADROIT_TASKS, assert_corl_settings, assert_update_equals_reference, build

import edac
import sac_n


# ---- the diversity term ---------------------------------------------------------------------------------
def test_diversity_loss_is_the_sum_of_pairwise_cosines_of_the_action_gradients_over_n_minus_one():
    # two critics, one state: cos((3, 0), (1, 1)) = 1/sqrt(2), counted for (1, 2) and (2, 1), over N - 1 = 1
    two = torch.tensor([[[3.0, 0.0]], [[1.0, 1.0]]])
    assert edac.diversity_loss(two).item() == pytest.approx(math.sqrt(2))
    # three critics: opposite (cos -1), and orthogonal to both (cos 0): 2 x (-1) / 2
    three = torch.tensor([[[1.0, 0.0]], [[-2.0, 0.0]], [[0.0, 5.0]]])
    assert edac.diversity_loss(three).item() == pytest.approx(-1.0)
    # averaged over the batch: the same state twice gives the same value
    assert edac.diversity_loss(torch.cat([two, two], dim=1)).item() == pytest.approx(math.sqrt(2))


def pairs_loop(action_grads: torch.Tensor) -> torch.Tensor:
    """The diversity term as the paper writes it: a Python loop over the batch and over every ordered pair i != j."""
    n, b, _ = action_grads.shape
    total = 0.0
    for k in range(b):
        for i in range(n):
            for j in range(n):
                if i != j:
                    total = total + torch.cosine_similarity(action_grads[i, k], action_grads[j, k], dim=0, eps=0)
    return total / b / (n - 1)


def test_diversity_loss_equals_a_plain_loop_over_pairs_and_its_gradient_too():
    grads = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    batched, looped = edac.diversity_loss(grads), pairs_loop(grads)
    torch.testing.assert_close(batched, looped)
    (g_batched,) = torch.autograd.grad(batched, grads)
    (g_looped,) = torch.autograd.grad(looped, grads)
    torch.testing.assert_close(g_batched, g_looped)


# ---- the update step ------------------------------------------------------------------------------------
def corl_diversity_term(args):
    """CORL's EDAC critic term, eta x _critic_diversity_loss, over separate critics: each critic's gradient with
    respect to its own copy of the data action (create_graph, so that the term trains the critics), then the pairs."""

    def term(critics, obs, actions):
        grads = []
        for critic in critics:
            own = actions.clone().requires_grad_(True)
            q = critic(torch.cat([obs, own], dim=-1)).sum()
            grads.append(torch.autograd.grad(q, own, create_graph=True)[0])
        return args.eta * pairs_loop(torch.stack(grads))

    return term


@pytest.mark.parametrize("steps", [1, 3])
def test_updates_equal_corls_sequential_steps_over_separate_critics(steps):
    assert_update_equals_reference(edac, steps, corl_diversity_term, eta=5.0)


def test_with_eta_zero_the_update_is_sac_ns():
    _, edac_nets, edac_update, batch = build(edac, eta=0.0)
    _, sac_n_nets, sac_n_update, _ = build(sac_n)
    for step in (1, 2):
        torch.manual_seed(step)
        edac_metrics = edac_update(batch, step)
        torch.manual_seed(step)
        sac_n_metrics = sac_n_update(batch, step)
    for name, value in sac_n_metrics.items():
        torch.testing.assert_close(edac_metrics[name], value)
    for name in sac_n_nets:
        torch.testing.assert_close(edac_nets[name].state_dict(), sac_n_nets[name].state_dict())
    assert edac_metrics["losses/diversity_loss"].abs() > 0  # computed, weighted 0


# ---- compiled and bf16 variants -------------------------------------------------------------------------
def test_compiled_update_equals_the_eager_one_and_never_recompiles():
    """The critics' values and action gradients stay eager under --compile (double backward); the rest compiles."""
    runs = compiled_and_eager_updates(lambda compile: build(edac, compile=compile, n_hidden=1), steps=3)
    graphs = runs[True][2]
    assert graphs[0] < graphs[1] == graphs[3], graphs
    assert_compiled_equals_eager(runs)


def test_bf16_update_stays_close_to_float32():
    _, _, fp32, batch = build(edac)
    _, _, bf16, _ = build(edac, bf16=True)
    names = ("critic_loss", "q_data", "q_target", "actor_loss", "diversity_loss")
    assert_bf16_close(fp32, bf16, batch, 2, "q_data", names)


# ---- settings tables and refused values -----------------------------------------------------------------
# (num_critics, eta) of every configs/offline/edac/<env>/<dataset>.yaml, under the names of test_sac_n.CORL_SAC_N
CORL_EDAC = {
    **{f"antmaze-{kind}-v2": (10, 1.0) for kind in ("umaze", "umaze-diverse", "medium-play", "medium-diverse")},
    **{f"antmaze-{kind}-v2": (10, 1.0) for kind in ("large-play", "large-diverse")},
    **{f"{task}-{kind}-v1": (50, 200.0) for task in ADROIT_TASKS[1:] for kind in ("human", "cloned", "expert")},
    "pen-human-v1": (20, 1000.0),
    "pen-cloned-v1": (20, 10.0),
    "pen-expert-v1": (20, 10.0),
    **{f"maze2d-{kind}-v1": (10, 0.1) for kind in ("umaze", "medium", "large")},
    "halfcheetah-medium-v0": (10, 1.0),
    "hopper-medium-v0": (50, 1.0),
    "walker2d-medium-v0": (10, 1.0),
}


@pytest.mark.parametrize("env", CORL_EDAC)
def test_settings_are_corls_for_every_dataset_of_its_configs(env):
    num_critics, eta = CORL_EDAC[env]
    assert_corl_settings(edac, env, {"num_critics": num_critics, "eta": eta})


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(eta=-1.0), "eta must be >= 0"),
        (dict(num_critics=1), "num_critics must be >= 2"),
        (dict(online_steps=10), "trains offline only"),
    ],
)
def test_out_of_range_values_and_fine_tuning_are_refused(flags, message):
    assert_invalid(edac, flags, message)
