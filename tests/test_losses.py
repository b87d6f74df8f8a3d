"""Every formula of losses.py on hand-made tensors."""
import torch

from losses import L1, L2, erase_target, in_space, to_x0, total


def test_erase_target_eta_neg_zero_is_eq3():
    eps_n, eps_e = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.5])
    assert torch.equal(erase_target(eps_n, eps_e, 0.0), eps_n)  # Eq. 3: target eps_theta(c_n)


def test_erase_target_negative_guidance_pushes_away_from_c_e():
    eps_n, eps_e = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.5])
    # eps(c_n) - 1 * (eps(c_e) - eps(c_n)) = 2 eps(c_n) - eps(c_e)
    assert torch.allclose(erase_target(eps_n, eps_e, 1.0), torch.tensor([-2.0, -4.5]))
    assert torch.allclose(erase_target(eps_n, eps_e, 0.5), torch.tensor([-0.5, -3.25]))


def test_l1_l2_are_mean_squared_errors_and_total_adds_lambda_l2():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 0.0, 3.0, 5.0])
    assert torch.isclose(L1(a, b), torch.tensor(5.0 / 4))  # (0 + 4 + 0 + 1) / 4
    assert torch.isclose(L2(a, b), torch.tensor(5.0 / 4))
    assert torch.isclose(total(torch.tensor(2.0), torch.tensor(3.0), 0.5), torch.tensor(3.5))


def test_l1_gradient_pulls_eps_prime_towards_the_target():
    """d/d eps' mean((eps' - target)^2) = 2 (eps' - target) / n: descent moves eps_theta'(c_e)
    towards the target, not away (a sign error in L1 or the target would push it away).
    Which outputs carry a gradient in erase.py: tests/test_loop.py."""
    eps_prime = torch.tensor([0.5, 1.5], requires_grad=True)
    target = erase_target(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]), 1.0)  # [0, 2]
    L1(eps_prime, target).backward()
    assert torch.allclose(eps_prime.grad, torch.tensor([0.5, -0.5]))
    stepped = eps_prime.detach() - 0.1 * eps_prime.grad
    assert L1(stepped, target) < L1(eps_prime.detach(), target)
    assert erase_target(target, None, 0.0) is target  # Eq. 3 needs no eps_theta(c_e)


def test_x0_from_eps_inverts_the_forward_process():
    x0, eps, abar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor(0.3)
    z_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # q(z_t | x0)
    assert torch.allclose(to_x0(eps, z_t, abar), x0, atol=1e-6)


def test_x0_space_loss_is_eps_loss_weighted_by_one_minus_abar_over_abar():
    z, e1, e2, abar = torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4), torch.tensor(0.2)
    eps_loss = L2(in_space(e1, z, abar, "eps"), in_space(e2, z, abar, "eps"))
    x0_loss = L2(in_space(e1, z, abar, "x0"), in_space(e2, z, abar, "x0"))
    assert torch.isclose(x0_loss, eps_loss * (1 - abar) / abar, rtol=1e-5)
