"""bf16 autocast (the CUDA default) against fp32, on the tiny model, with stated tolerances."""
import json

import torch

import erase
from sample import load_model


def test_bf16_unet_forward_is_within_two_percent(tiny_sd):
    unet = load_model(tiny_sd).unet
    z, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    ref = unet(z, 500, encoder_hidden_states=c).sample
    with torch.autocast("cpu", torch.bfloat16):
        low = unet(z, 500, encoder_hidden_states=c).sample.float()
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2% a value); through the
    # network's layers that grows to well under 2% of the output's norm
    assert (low - ref).norm() / ref.norm() < 0.02


def test_bf16_and_fp32_losses_agree(tiny_sd, tmp_path):
    logs = {}
    for precision in ("fp32", "bf16"):
        erase.main(["--model", tiny_sd, "--concept", "church", "--method", "fixed", "--preserve", "road",
                    "--steps", "3", "--ddim_steps", "5", "--device", "cpu", "--precision", precision,
                    "--out", str(tmp_path / precision)])
        logs[precision] = [json.loads(line) for line in open(tmp_path / precision / "log.jsonl")]
    for a, b in zip(logs["fp32"], logs["bf16"]):
        assert a["t"] == b["t"]  # the same draws
        for key in ("l1", "l2"):
            # L = mean((a - b)^2) of unit-scale eps: errors of 2% of eps (above) move L by at
            # most 2 sqrt(L) 0.02 + 0.02^2; on this random model L is small (c barely matters)
            tol = 2 * a[key] ** 0.5 * 0.02 + 4e-4
            assert abs(a[key] - b[key]) <= tol, (key, a[key], b[key])


def test_gradient_checkpointing_changes_memory_not_results(tiny_sd, tmp_path):
    from safetensors.torch import load_file
    w = {}
    for flag in ([], ["--grad_checkpointing"]):
        out = tmp_path / ("ckpt" if flag else "plain")
        w[bool(flag)] = load_file(erase.main(["--model", tiny_sd, "--concept", "church", "--method", "esd",
                                              "--train_method", "noxattn", "--steps", "2", "--lr", "1e-3",
                                              "--ddim_steps", "3", "--device", "cpu", "--out", str(out),
                                              *flag]))
    assert all(torch.allclose(w[True][n], w[False][n], atol=1e-6) for n in w[False])
