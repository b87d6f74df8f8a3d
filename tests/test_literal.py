"""The fast loop (erase.py) against the literal transcription of Algorithms 1-2 (literal.py),
on the same random draws (one seed; both take them from erase.draws): every update's L1 and
L2 and the trained weights after 6 updates agree, for every method and each flag that changes
the arithmetic, on SD-1, SD-2 768-v (v-prediction) and SDXL.

float64 is where the proof lives: there the two loops agree to ~1e-12, so a single wrong
term, sign, timestep or concept shows at once. In fp32 a batched and an unbatched forward
differ by ~1e-6 of their value (the CPU's kernels block the sums differently), and L2, the
difference of two nearly equal outputs, magnifies that: fp32 is checked at the tolerance it
allows: relative 1e-5 plus the rounding of a mean of squares, 2 sqrt(L) delta + delta^2 for
inputs that differ by delta = 2e-6 (the batched / unbatched difference measured here), and the
weights' displacement from theta within 1e-3 of its norm after 6 updates at the paper's lr 1e-5
(Adam's first step is lr sign(g): rounding can flip the sign of a near-zero gradient component
and move that one weight 2 lr the other way)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import erase
import literal
from family import load_model

# method rows x the flags that change the arithmetic; each row runs in both timestep modes
ROWS = [
    ("eap hard, N_iter 1", ["--method", "eap", "--n_iter", "1", "--loss_space", "x0", "--negative_guidance", "1"]),
    ("eap hard, N_iter 2", ["--method", "eap", "--n_iter", "2", "--pi_grad", "trained"]),
    ("eap soft, N_iter 1", ["--method", "eap", "--soft", "--n_iter", "1", "--pi_grad", "trained",
                            "--negative_guidance", "1"]),
    ("eap soft, N_iter 2, sgd", ["--method", "eap", "--soft", "--n_iter", "2", "--loss_space", "x0",
                                 "--pi_optim", "sgd", "--eta", "1e-2"]),
    ("esd", ["--method", "esd", "--negative_guidance", "1", "--loss_space", "x0"]),
    ("esd, Eq. 3", ["--method", "esd"]),
    ("fixed", ["--method", "fixed", "--preserve", "road", "--loss_space", "x0"]),
    # train-esd-preserve.py: L2 on z (sampled with c_e), not on a z_r sampled with the fixed concept
    ("fixed, L2 on z", ["--method", "fixed", "--preserve", "road", "--l2_on", "z"]),
    ("age", ["--method", "age", "--tau", "0.1", "--negative_guidance", "1"]),
    ("age soft, eps", ["--method", "age", "--soft", "--pi_grad", "trained"]),
    ("pgd", ["--method", "eap", "--search", "pgd", "--negative_guidance", "1", "--eta", "1e-2"]),
    ("ca", ["--method", "ca", "--loss_space", "x0", "--ca_images", "6"]),
    ("ca, trained target", ["--method", "ca", "--anchor", "car", "--ca_target", "trained", "--ca_images", "6"]),
    ("ca, trajectory", ["--method", "ca", "--ca_mode", "trajectory", "--loss_space", "x0"]),
    # ESD's current code: z_t from the frozen model, attn2's keys and values only (ESD-x-strict)
    ("esd, frozen sampler, strict", ["--method", "esd", "--sampler", "frozen", "--negative_guidance", "1",
                                     "--train_method", "xattn-strict"]),
    ("eap, frozen sampler", ["--method", "eap", "--sampler", "frozen", "--n_iter", "1", "--pi_grad", "trained"]),
]
CASES = [(name, flags + ["--timestep", mode]) for name, flags in ROWS for mode in ("matched", "published")]
# AGE's top-k (--gumbel_topk 2 of K 4), matched timesteps only: hard ignores it (AGE's objects
# command), soft keeps the 2 largest weights renormalised (AGE's artists command)
CASES += [("age hard, top-k 2", ["--method", "age", "--tau", "0.1", "--gumbel_topk", "2",
                                 "--negative_guidance", "1", "--timestep", "matched"]),
          ("eap soft, top-k 2", ["--method", "eap", "--soft", "--gumbel_topk", "2", "--n_iter", "2",
                                 "--pi_grad", "trained", "--timestep", "matched"])]
# pgd as train_adversarial_pgd.py steps: c_a += eta g / ||g|| ||c_a||, L2 on z, lambda 0.01
CASES += [("pgd, published step", ["--method", "eap", "--search", "pgd", "--pi_optim", "normalized", "--l2_on", "z",
                                   "--pi_grad", "trained", "--lam", "0.01", "--n_iter", "2", "--timestep", "published"])]
# the published k-means with k_closest 3 < K 4: three candidates, pi of length 3, the K noises' first 3
CASES += [("eap, kmeans-sklearn 3 of K 4", ["--method", "eap", "--select", "kmeans-sklearn", "--k_closest", "3",
                                            "--timestep", "matched"])]
# every row on SD-2 768-v (v-prediction) and SDXL (two encoders, pooled, micro-conditioning), the
# timestep modes alternating; SDXL's c_n as zeros too
FAMILY_CASES = [(kind, name, flags + ["--timestep", ("matched", "published")[i % 2]])
                for kind in ("sd2-v", "sdxl") for i, (name, flags) in enumerate(ROWS)]
FAMILY_CASES += [("sdxl", "eap, c_n zeros", ["--method", "eap", "--empty", "zeros", "--timestep", "matched"])]


def both(tiny_sd, vocab, out, flags, dtype, lr):
    """Run erase.main and literal.main with the same flags on fresh copies in `dtype`; return
    (fast log, literal log, fast weights, literal weights)."""
    argv = ["--model", tiny_sd, "--concept", "garbage truck", "--steps", "6", "--K", "4",
            "--vocab", vocab, "--ddim_steps", "4", "--lr", lr, "--eta", "0.5", "--device", "cpu",
            "--seed", "3", "--cache_dir", os.path.join(os.path.dirname(vocab), "cache"), *flags]

    def fresh():
        m = load_model(tiny_sd, "cpu", vae=False)
        m.unet.to(dtype), [e.to(dtype) for e in m.text_encoders]
        return m
    w_fast = load_file(erase.main(argv + ["--out", str(out / "fast")], m=fresh()))
    w_lit = load_file(literal.main(argv + ["--out", str(out / "literal")], m=fresh(), unet_orig=fresh().unet))
    logs = [[json.loads(line) for line in open(out / run / "log.jsonl")] for run in ("fast", "literal")]
    return logs[0], logs[1], w_fast, w_lit


def displacement_gap(tiny_sd, w_fast, w_lit):
    """|| (theta'_fast - theta) - (theta'_lit - theta) || / || theta'_lit - theta ||: fp32 rounding
    can flip the sign of a near-zero gradient component, which Adam's first step turns into a
    difference of 2 lr in that one weight; the displacement as a whole still agrees."""
    theta = dict(load_model(tiny_sd).unet.named_parameters())
    gap = sum(float((w_fast[n] - w_lit[n]).pow(2).sum()) for n in w_fast) ** 0.5
    moved = sum(float((w_lit[n] - theta[n]).pow(2).sum()) for n in w_lit) ** 0.5
    return gap / moved


def close(a, b, rel, floor=0.0):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + floor


def close32(a, b, delta=2e-6):
    """fp32: relative 1e-5, plus what rounding delta of the two outputs does to a mean of squares."""
    big = max(abs(a), abs(b))
    return close(a, b, 1e-5, 2 * big ** 0.5 * delta + delta ** 2)


def equal_in_float64(model, vocab, tmp_path, name, flags):
    fast, lit, w_fast, w_lit = both(model, vocab, tmp_path, flags, torch.float64, "1e-2")
    assert len(fast) == len(lit) == 6
    assert len({r["t_enc"] for r in fast}) >= 2  # the draws cover more than one stop
    for a, b in zip(fast, lit):
        assert (a["t_enc"], a["t"], a["c_e"], a["c_a"]) == (b["t_enc"], b["t"], b["c_e"], b["c_a"])
        for key in ("l1", "l2"):
            assert close(a[key], b[key], 1e-9, 1e-18), (a["step"], key, a[key], b[key])
    assert any(r["l2"] > 1e-6 for r in fast) or name.startswith(("esd", "ca"))  # L2 is not trivially zero
    assert set(w_fast) == set(w_lit)
    # 1e-9: where a gradient is rounding noise in one loop and 0 in the other (L2 at theta' = theta,
    # ~1e-16), Adam's step lr g / (|g| + 1e-8) still moves that weight by up to lr 1e-8 = 1e-10
    assert all(torch.allclose(w_fast[n], w_lit[n], rtol=0, atol=1e-9) for n in w_fast)


@pytest.mark.parametrize("name,flags", CASES, ids=[f"{n}, {f[-1]}" for n, f in CASES])
def test_fast_loop_is_the_literal_algorithm_float64(tiny_sd, vocab, tmp_path, name, flags):
    equal_in_float64(tiny_sd, vocab, tmp_path, name, flags)


@pytest.mark.parametrize("kind,name,flags", FAMILY_CASES, ids=[f"{k}: {n}, {f[-1]}" for k, n, f in FAMILY_CASES])
def test_fast_loop_is_the_literal_algorithm_on_every_family_float64(tiny_kind, vocab, tmp_path, kind, name, flags):
    equal_in_float64(tiny_kind(kind), vocab, tmp_path, name, flags)


@pytest.mark.parametrize("name,flags", ROWS[::2], ids=[n for n, _ in ROWS[::2]])
def test_fast_loop_is_the_literal_algorithm_float32(tiny_sd, vocab, tmp_path, name, flags):
    fast, lit, w_fast, w_lit = both(tiny_sd, vocab, tmp_path, flags, torch.float32, "1e-5")
    for a, b in zip(fast, lit):
        assert (a["t_enc"], a["t"], a["c_a"]) == (b["t_enc"], b["t"], b["c_a"])
        for key in ("l1", "l2"):
            assert close32(a[key], b[key]), (a["step"], key, a[key], b[key])
    assert displacement_gap(tiny_sd, w_fast, w_lit) <= 1e-3


def test_literal_cli_loads_two_copies_and_writes_erase_pys_files(tiny_sd, vocab, tmp_path):
    """`python literal.py` (erase.py's flags): two copies loaded from the checkpoint; after one
    update of the literal loop, the weights equal erase.py's to fp32's rounding."""
    import subprocess
    import sys
    argv = ["--model", tiny_sd, "--concept", "church", "--steps", "1", "--K", "4", "--vocab", vocab,
            "--ddim_steps", "3", "--device", "cpu", "--cache_dir", str(tmp_path / "cache")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "literal.py"), *argv, "--out", str(tmp_path / "lit")],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert sorted(os.listdir(tmp_path / "lit")) == ["config.json", "log.jsonl", "weights.safetensors"]
    lit = load_file(tmp_path / "lit" / "weights.safetensors")
    fast = load_file(erase.main(argv + ["--out", str(tmp_path / "fast")]))
    assert displacement_gap(tiny_sd, fast, lit) <= 1e-3
