"""The losses of Section 3.1 and Section 4 (Eqs. 3, 4, 5), as pure tensor functions.

Notation: eps_theta is the frozen original UNet, eps_theta' the one being trained;
c_e the concept to erase, c_n the neutral concept "", c_a the adversarial concept.

||.||_2^2 is computed as a mean over elements (as the published code does with
MSELoss): a constant factor that the learning rate absorbs.

Where the printed paper and the published code differ:
- the erase target: Eq. 3 maps eps_theta'(c_e) to eps_theta(c_n); the published code
  (like ESD) pushes past it with "negative guidance" eta_neg = 1:
      eps_theta(c_n) - eta_neg (eps_theta(c_e) - eps_theta(c_n));   eta_neg = 0 is Eq. 3.
  erase.py: --negative_guidance (default 0, the printed equation).
- the loss space: the paper prints both losses on eps; the published code, which produced
  the published numbers, compares predicted x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),
  i.e. the eps loss weighted by (1 - abar_t) / abar_t. erase.py: --loss_space eps|x0
  (default eps, the printed equations).
"""


def sq(a, b):
    """|| a - b ||_2^2, as a mean over elements."""
    return (a - b).pow(2).mean()


def erase_target(eps_n, eps_e, eta_neg=0.0):
    """Eq. 3's target, with the published code's negative guidance:
    eps_theta(c_n) - eta_neg (eps_theta(c_e) - eps_theta(c_n)). Both inputs come from the
    frozen model; eta_neg = 0 returns eps_theta(c_n) (Eq. 3 exactly), and eps_e may then be None
    (erase.py skips that forward)."""
    if not eta_neg:
        return eps_n
    return eps_n - eta_neg * (eps_e - eps_n)


def to_x0(eps, z_t, abar_t):
    """Predicted x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (the published code's loss space)."""
    return (z_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def in_space(eps, z_t, abar_t, space):
    """eps itself (printed Eqs. 3-5) or the x0 it predicts (published code)."""
    return eps if space == "eps" else to_x0(eps, z_t, abar_t)


def L1(eps_prime_e, target):
    """Eq. 4/5, L1 = || eps_theta'(c_e) - eps_theta(c_n) ||^2  (target from erase_target)."""
    return sq(eps_prime_e, target)


def L2(eps_prime_a, eps_a):
    """Eq. 4/5, L2 = || eps_theta'(c_a) - eps_theta(c_a) ||^2, c_a = G(pi) R in Eq. 5."""
    return sq(eps_prime_a, eps_a)


def total(l1, l2, lam):
    """Eq. 4/5, the objective minimised over theta': L1 + lambda L2."""
    return l1 + lam * l2
