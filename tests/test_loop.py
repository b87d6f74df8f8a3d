"""What one update of erase.py feeds the UNet, seen by a hook on every forward: the concept
that conditions z_r is the c_a of every L2; which forwards run; which outputs carry a gradient;
and the timestep the UNet is queried at, against the noise level z_t sits at."""
import argparse
import json

import pytest
import torch

import erase
from family import ddim, encode, eps, load_model


def watched(tiny_sd, vocab, tmp_path, *flags):
    """Run erase.py for 1 update; return the forwards [(frozen?, contexts, output needs grad)],
    the log record and the model."""
    m = load_model(tiny_sd, vae=False)
    calls = []

    def hook(mod, args, kw, out):
        probe = next(p for n, p in mod.named_parameters() if "attn2" in n)  # theta or theta'
        calls.append((not probe.requires_grad, kw["encoder_hidden_states"].detach().clone(),
                      out.sample.requires_grad))
    m.unet.register_forward_hook(hook, with_kwargs=True)
    erase.main(["--model", tiny_sd, "--concept", "garbage truck", "--steps", "1", "--K", "10",
                "--vocab", vocab, "--ddim_steps", "4", "--device", "cpu", "--out", str(tmp_path),
                "--cache_dir", str(tmp_path / "cache"), *flags], m=m)
    return calls, json.loads(open(tmp_path / "log.jsonl").readline()), m


@pytest.mark.parametrize("seed", range(4))
def test_z_r_and_every_l2_use_the_drawn_concept(tiny_sd, vocab, tmp_path, seed):
    calls, rec, m = watched(tiny_sd, vocab, tmp_path, "--seed", str(seed), "--n_iter", "2")
    c_n, c_e = encode(m, [""])[0], encode(m, ["garbage truck"])[0]
    others = {tuple(c.flatten().tolist()) for _, cs, _ in calls for c in cs
              if not (torch.equal(c, c_n) or torch.equal(c, c_e))}
    assert len(others) == 1  # one c_a, in the sampling of z_r, the ascent and the model step
    c_a = torch.tensor(next(iter(others))).view(77, -1)
    assert torch.allclose(c_a, encode(m, [rec["c_a"]])[0], atol=1e-2)  # the logged word (R is fp16)


@pytest.mark.parametrize("pi_grad", ["both", "trained"])
def test_gradients_reach_the_frozen_branch_only_where_asked(tiny_sd, vocab, tmp_path, pi_grad):
    calls, rec, _ = watched(tiny_sd, vocab, tmp_path, "--pi_grad", pi_grad, "--n_iter", "2")
    ascent = [c for c in calls if len(c[1]) == 1]  # the only single-image forwards
    assert len(ascent) == 4  # N_iter x (trained, frozen)
    frozen_in_ascent = [g for frozen, _, g in ascent if frozen]
    assert frozen_in_ascent == [pi_grad == "both"] * 2  # Algorithm 1 as printed / as coded
    model_step = calls[-2:]  # frozen batch, then trained batch
    assert [frozen for frozen, _, _ in model_step] == [True, False]
    assert [g for _, _, g in model_step] == [False, True]  # targets are constants
    sampling = [c for c in calls if len(c[1]) == 4]  # [c_n, c_n, c_e, c_a] with guidance
    assert sampling and not any(g for _, _, g in sampling)  # z_t carries no gradient


@pytest.mark.parametrize("method,eta_neg,frozen,trained", [
    ("esd", "0", 1, 1), ("esd", "1", 2, 1), ("fixed", "0", 2, 2), ("fixed", "1", 3, 2),
    ("eap", "0", 2, 2), ("eap", "1", 3, 2), ("age", "0", 2, 2), ("age", "1", 3, 2)])
def test_the_model_step_runs_only_the_forwards_it_uses(tiny_sd, vocab, tmp_path, method, eta_neg, frozen, trained):
    flags = ["--method", method, "--negative_guidance", eta_neg] + (["--preserve", "road"] if method == "fixed" else [])
    calls, rec, _ = watched(tiny_sd, vocab, tmp_path, *flags)
    assert [len(cs) for _, cs, _ in calls[-2:]] == [frozen, trained]
    sampled = 2 if method in ("fixed", "eap", "age") else 1  # z, and z_r
    n_iter = 2 if method in ("eap", "age") else 0
    images = sum(len(cs) for _, cs, _ in calls)  # README: forwards per update
    assert images == 2 * sampled * rec["t_enc"] + 2 * n_iter + frozen + trained


class Oracle(torch.nn.Module):
    """A UNet that knows x0: eps(z_t, t) = (z_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) exactly, so
    DDIM keeps z on the forward process: after it, z = sqrt(abar_s) x0 + sqrt(1 - abar_s) e."""
    def __init__(self, x0, abar):
        super().__init__()
        self.x0, self.abar = x0, abar

    def forward(self, z, t, encoder_hidden_states=None):
        a = self.abar[int(t)]
        return argparse.Namespace(sample=(z - a.sqrt() * self.x0) / (1 - a).sqrt())


@pytest.mark.parametrize("t_enc", [0, 1, 2, 17, 49])
def test_the_queried_timestep_and_z_t_noise_level(tiny_sd, t_enc):
    """matched: z_T at 981, and the UNet is queried at exactly the timestep z_t sits at.
    published: z_T at 961 (the CompVis sampler's timesteps[:-1]); z_t sits two DDIM steps below
    the band [20 t_enc, 20 t_enc + 20) its query is drawn from (t_enc >= 2; below, at the clean
    end), and x0 uses abar at DDIM index t_enc, 20 t_enc + 1. The oracle's z_T is built at the
    timestep the mode says it sits at: started anywhere else, DDIM leaves the forward process."""
    sched = load_model(tiny_sd).scheduler
    sched.set_timesteps(50)
    ts, abar = sched.timesteps.tolist(), sched.alphas_cumprod
    x0, e = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    abar64 = abar.double()
    c = torch.zeros(1, 77, 32, dtype=torch.float64)

    def level(z):  # the timestep s with z = sqrt(abar_s) x0 + sqrt(1 - abar_s) e
        err = torch.stack([(z - abar64[s].sqrt() * x0 - (1 - abar64[s]).sqrt() * e).abs().max()
                           for s in range(1000)])
        assert err.min() < 1e-5  # z is on the forward process (the scheduler's abar is fp32)
        return int(err.argmin())
    for mode, at in (("matched", 981), ("published", 961)):
        z_T = abar64[at].sqrt() * x0 + (1 - abar64[at]).sqrt() * e
        args = argparse.Namespace(ddim_steps=50, timestep=mode)
        d = argparse.Namespace(t_enc=t_enc, t=20 * t_enc + 7)  # a query from the published band
        first, stop, t, t_x0 = erase.when(args, ts, d)
        assert ts[first] == at and stop - first == (t_enc if mode == "matched" else min(49, 50 - t_enc))
        z, _ = ddim(lambda z, t, c: Oracle(x0, abar64)(z, t).sample, sched, z_T, c, c, 3.0, 50, stop, start=first)
        if mode == "matched":
            assert level(z) == t == t_x0 == ts[t_enc]
        else:
            assert level(z) == (20 * t_enc - 39 if t_enc >= 2 else 0)
            assert t_x0 == 20 * t_enc + 1 and 20 * t_enc <= t < 20 * t_enc + 20


@pytest.mark.parametrize("ca_target", ["frozen", "trained"])
def test_concept_ablation_samples_and_targets_the_anchor(tiny_sd, vocab, tmp_path, ca_target):
    """CA: z_t on the frozen model's trajectory for the anchor; the target is the anchor's
    prediction on that z_t (frozen model, or the trained one under no_grad: CA's code)."""
    calls, rec, m = watched(tiny_sd, vocab, tmp_path, "--method", "ca", "--ca_target", ca_target,
                            "--seed", "3", "--ca_mode", "trajectory")
    c_n, c_e, c_anc = (encode(m, [p])[0] for p in ("", "garbage truck", "truck"))
    assert rec["anchor"] == "truck"  # the default: the category word
    *sampling, target, trained = calls
    assert len(sampling) == rec["t_enc"] and rec["t_enc"] > 0
    for frozen, cs, grad in sampling:  # guidance: [c_n, c_anchor], frozen weights, no gradient
        assert frozen and not grad and torch.equal(cs[0], c_n) and torch.equal(cs[1], c_anc)
    assert target[0] == (ca_target == "frozen") and not target[2] and torch.equal(target[1][0], c_anc)
    assert not trained[0] and trained[2] and torch.equal(trained[1][0], c_e)


@pytest.mark.parametrize("anchor", ["truck", "car"])
def test_concept_ablation_as_its_code_trains(tiny_sd, tmp_path, anchor):
    """CA (--ca_mode images): the anchor images are the original model's DDIM samples for c*;
    update 0's losses by hand from its draws: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
    L1 = || eps_theta'(x_t, c_e) - eps_theta(x_t, c*) ||^2, and where c* overlaps c_e ("truck" in
    "garbage truck", not "car") the prior term || eps_theta'(x_t', c*) - eps' ||^2; t ~ U{0..999}."""
    import ca
    argv = ["--model", tiny_sd, "--concept", "garbage truck", "--method", "ca", "--anchor", anchor, "--ca_images", "3",
            "--ddim_steps", "4", "--steps", "1", "--seed", "3", "--device", "cpu", "--cache_dir", str(tmp_path / "c"),
            "--out", str(tmp_path / "o")]
    m = load_model(tiny_sd, vae=False)
    args = erase.parse_args(argv)
    C = erase.concepts(m, args)
    A = ca.anchor_latents(m, args, C.anchor, C.n)
    cfg = m.unet.config
    z_T = torch.randn(3, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(3))
    by_hand, _ = ddim(lambda z, t, c: eps(m, z, t, c), m.scheduler, z_T, C.anchor.expand(3, -1, -1),
                      C.n.expand(3, -1, -1), 7.5, 4)
    assert torch.allclose(A[0], by_hand, atol=1e-6)
    erase.main(argv, m=load_model(tiny_sd, vae=False))
    rec = json.loads(open(tmp_path / "o" / "log.jsonl").readline())
    d = erase.draws(torch.Generator().manual_seed(3), args, 1, (1, *A.shape[2:]), 1000)
    abar = m.scheduler.alphas_cumprod
    x_t = ca.noised(A[0, d.ca.j:d.ca.j + 1], d.ca.t, d.ca.noise, abar)
    assert x_t.shape == (1, *A.shape[2:]) and torch.allclose(x_t, abar[d.ca.t].sqrt() * A[0, d.ca.j] + (1 - abar[d.ca.t]).sqrt() * d.ca.noise)
    with torch.no_grad():
        l1 = (eps(m, x_t, d.ca.t, C.e) - eps(m, x_t, d.ca.t, C.anchor)).pow(2).mean()
    assert rec["t"] == d.ca.t and abs(rec["l1"] - float(l1)) <= 1e-5 * float(l1)
    if anchor == "car":
        assert d.ca.prior is None and rec["l2"] == 0
    else:
        j, t_p, noise = d.ca.prior
        x_p = ca.noised(A[0, j:j + 1], t_p, noise, abar)
        with torch.no_grad():
            l2 = (eps(m, x_p, t_p, C.anchor) - noise).pow(2).mean()
        assert abs(rec["l2"] - float(l2)) <= 1e-5 * float(l2)
    gen = torch.Generator().manual_seed(0)
    ts = [ca.draw(gen, args, 0, (1, 4, 2, 2), 1000).t for _ in range(300)]
    assert min(ts) < 20 and max(ts) > 980  # the whole range, not DDIM's grid or a band


@pytest.mark.parametrize("l2_on", ["z_r", "z"])
def test_l2_is_taken_on_z_r_or_on_z(tiny_sd, vocab, tmp_path, l2_on):
    """--l2_on z (train-esd-preserve.py, the published fixed-concept runs): no z_r is sampled and
    L2's two forwards see the z that L1 sees; z_r (printed): a second latent, sampled with c_a."""
    m = load_model(tiny_sd, vae=False)
    seen = []
    m.unet.register_forward_hook(lambda mod, a, kw, out: seen.append(
        (a[0].detach().clone(), kw["encoder_hidden_states"].detach().clone())), with_kwargs=True)
    erase.main(["--model", tiny_sd, "--concept", "garbage truck", "--method", "fixed", "--preserve", "road",
                "--l2_on", l2_on, "--steps", "1", "--ddim_steps", "4", "--seed", "3", "--device", "cpu",
                "--out", str(tmp_path)], m=m)
    rec = json.loads(open(tmp_path / "log.jsonl").readline())
    c_road = encode(m, ["road"])[0]
    *sampling, (z_frozen, c_frozen), (z_trained, c_trained) = seen
    assert len(sampling) == rec["t_enc"] > 0
    assert all(len(cs) == (4 if l2_on == "z_r" else 2) for _, cs in sampling)  # c_a guides z_r or nothing
    assert torch.equal(c_frozen[-1], c_road) and torch.equal(c_trained[-1], c_road)  # L2's forwards
    same = torch.equal(z_trained[0], z_trained[-1]) and torch.equal(z_frozen[0], z_frozen[-1])
    assert same == (l2_on == "z")  # L1's latent z and L2's
