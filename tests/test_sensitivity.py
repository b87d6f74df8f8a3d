"""sensitivity.py, Fig. 2 as published: -|| eps_theta'(z, t, c) - eps_theta(z, t, c) || per concept,
at the published z (the sanitized model's DDIM on "a photo", stopped at time_step 20) and t."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import lora
import sensitivity
from family import ddim, empty, encode, eps, load_model

ROOT = os.path.dirname(os.path.abspath(sensitivity.__file__))


def erased_file(tiny_sd, path, kind):
    """A full delta (attn2 moved) or a LoRA adapter (random B, so that it changes the output)."""
    m = load_model(tiny_sd)
    if kind == "full":
        torch.manual_seed(0)
        save_file({n: p.detach() + 0.05 * torch.randn_like(p) for n, p in m.unet.named_parameters() if "attn2" in n},
                  str(path / "weights.safetensors"))
        return str(path / "weights.safetensors")
    from params import trained_parameter_names
    targets = lora.target_modules(m.unet, "xattn", trained_parameter_names(m.unet, "xattn"))
    params, config = lora.add(m.unet, targets, 2, 2.0, 0)
    with torch.no_grad():
        for n, p in params.items():
            p.add_(0.3 * torch.randn_like(p))
    return lora.save(str(path), m.unet, config, m.family, dict(model=tiny_sd, method="esd", concept="x",
                                                                  train_method="xattn"), "diffusers", "fp32")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_scores_are_minus_the_distance_between_two_separately_loaded_unets(tiny_sd, vocab, tmp_path, kind):
    """Against a hand computation with two UNets loaded apart: the original (nothing applied)
    and the sanitized (the weights applied as sample.py would), at the z and t the script used."""
    from params import load_weights
    path = erased_file(tiny_sd, tmp_path, kind)
    res = sensitivity.main(["--model", tiny_sd, "--weights", path, "--vocab", vocab, "--extra", "a photo, ",
                            "--device", "cpu", "--out", str(tmp_path / "out"), "--batch", "3"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    got = {r["concept"]: float(r["score"]) for r in rows}
    assert [float(r["score"]) for r in rows] == sorted(got.values(), reverse=True)  # highest first
    assert "a photo" in got and " " in got and res["concepts"] == len(rows)
    orig, erased = load_model(tiny_sd), load_model(tiny_sd)
    load_weights(erased, path)
    z, t, t_z = sensitivity.latent(erased, sensitivity.parse_args(["--weights", path, "--out", "x", "--device", "cpu"]))
    assert (t, t_z) == (res["t"], res["t_z"])
    words = list(got)
    c = encode(orig, words)
    with torch.no_grad():
        want = -(eps(erased, z.expand(len(c), -1, -1, -1), t, c) - eps(orig, z.expand(len(c), -1, -1, -1), t, c)
                 ).flatten(1).norm(dim=1)
    assert min(want) < -1e-3  # the erasure changed something
    assert torch.allclose(torch.tensor([got[w] for w in words]), want, rtol=1e-4, atol=1e-6)


def test_z_is_the_sanitized_models_published_ddim_and_t_its_band(tiny_sd, tmp_path):
    """time_step 20 of 50: z_T at 961 (the published sampler's first timestep), 30 steps, z at
    t = 361, by the sanitized model on "a photo" at guidance 3; t drawn from [400, 420)."""
    from params import load_weights
    path = erased_file(tiny_sd, tmp_path, "full")
    args = sensitivity.parse_args(["--weights", path, "--out", "x", "--device", "cpu", "--seed", "5"])
    orig, erased = load_model(tiny_sd), load_model(tiny_sd)
    load_weights(erased, path)
    z, t, t_z = sensitivity.latent(erased, args)
    assert 400 <= t < 420 and t_z == 361
    gen = torch.Generator().manual_seed(5)
    z_T = torch.randn(z.shape, generator=gen)
    with torch.no_grad():
        by_hand, at = ddim(lambda zz, s, c: eps(erased, zz, s, c), erased.scheduler, z_T, encode(erased, ["a photo"]),
                           empty(erased, False), 3.0, 50, 31, start=1)
    assert at == 361 and torch.allclose(z, by_hand, atol=1e-6)
    z_orig, _, _ = sensitivity.latent(orig, args)
    assert not torch.allclose(z, z_orig, atol=1e-4)  # the sanitized model's z, not the original's


def test_bad_input_is_one_line(tiny_sd, tmp_path):
    for extra, msg in [(["--weights", str(tmp_path / "none.safetensors")], "not a .safetensors file"),
                       (["--weights", "w.safetensors", "--time_step", "50"], "--time_step must be in 0..49")]:
        p = subprocess.run([sys.executable, "sensitivity.py", "--model", tiny_sd, "--out", str(tmp_path / "o"),
                            "--device", "cpu", *extra], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 2 and msg in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert not (tmp_path / "o").exists()
