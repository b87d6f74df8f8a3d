"""erase.py end to end on a tiny random SD folder: methods, parameters, resume, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import erase
import params
import uce
from cli import UsageError
from family import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dies_at_update(monkeypatch, n):
    """Kill the run (KeyboardInterrupt) when update n (counted from 1) computes L1."""
    real, calls = erase.L1, []

    def l1(*a):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(erase, "L1", l1)
    return lambda: monkeypatch.setattr(erase, "L1", real)  # undo


def run(tiny_sd, vocab, out, *extra):
    argv = ["--model", tiny_sd, "--concept", "garbage truck", "--steps", "3", "--K", "4",
            "--vocab", vocab, "--ddim_steps", "6", "--lr", "1e-3", "--device", "cpu",
            "--cache_dir", os.path.join(os.path.dirname(vocab), "cache"), "--out", str(out), *extra]
    return erase.main(argv)


@pytest.mark.parametrize("method,extra", [("eap", []), ("esd", []), ("fixed", ["--preserve", "road"]),
                                          ("fixed", ["--preserve", ""]), ("age", ["--tau", "0.1"]),
                                          ("eap", ["--search", "pgd"]),
                                          ("eap", ["--select", "kmeans", "--k_closest", "8", "--soft"]),
                                          ("ca", ["--ca_images", "4"]),
                                          ("ca", ["--anchor", "car", "--ca_target", "trained", "--ca_images", "4"]),
                                          ("ca", ["--ca_mode", "trajectory"])])
def test_each_method_trains_exactly_the_chosen_parameters(tiny_sd, vocab, tmp_path, method, extra):
    path = run(tiny_sd, vocab, tmp_path, "--method", method, *extra)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "log.jsonl", "weights.safetensors"]
    saved = load_file(path)
    original = dict(load_model(tiny_sd).unet.named_parameters())
    if method == "ca" and "trajectory" not in extra:  # CA's code: attn2's to_k and to_v
        assert set(saved) == {n for n in original if "attn2.to_k." in n or "attn2.to_v." in n}
    else:
        assert set(saved) == {n for n in original if "attn2" in n}  # ESD-x, the default
    assert any(not torch.equal(saved[n], original[n]) for n in saved)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 1, 2] and all(r["c_e"] == "garbage truck" for r in log)
    if method in ("esd", "ca"):
        anchor = "car" if "car" in extra else "truck"
        prior = method == "ca" and anchor == "truck" and "trajectory" not in extra  # "truck" in "garbage truck"
        assert all(r["c_a"] is None and (r["l2"] > 0) == prior for r in log)
        if method == "ca":
            assert all(r["anchor"] == anchor for r in log)
            config = json.load(open(tmp_path / "config.json"))
            assert config["anchors"] == [anchor] and config["ca_target"] == ("trained" if "trained" in extra else "frozen")
    elif method == "fixed":
        assert all(r["c_a"] == extra[1] for r in log)
    else:
        assert all(r["c_a"] in open(vocab).read().split() for r in log) and any(r["l2"] > 0 for r in log)
    assert json.load(open(tmp_path / "config.json"))["method"] == method


@pytest.mark.parametrize("train_method", ["noxattn", "full"])
def test_train_methods(tiny_sd, vocab, tmp_path, train_method):
    saved = load_file(run(tiny_sd, vocab, tmp_path, "--method", "esd", "--train_method", train_method))
    names = [n for n, _ in load_model(tiny_sd).unet.named_parameters()]
    if train_method == "full":
        assert set(saved) == set(names)
    else:
        assert set(saved) == {n for n in names if "attn2" not in n and not n.startswith(
            ("time_embedding", "conv_out", "conv_norm_out"))}
        assert any(n.startswith("conv_in") for n in saved)


def test_the_frozen_model_keeps_the_original_values(tiny_sd):
    m = load_model(tiny_sd)
    theta = {n: p.detach().clone() for n, p in m.unet.named_parameters() if "attn2" in n}
    eps_theta = params.frozen(m, theta)
    z, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    before = eps_theta(z, 10, c)
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "attn2" in n:
                p.mul_(3.0)  # theta' moves
    assert torch.equal(eps_theta(z, 10, c), before)  # eps_theta does not
    assert not torch.allclose(m.unet(z, 10, encoder_hidden_states=c).sample, before)
    assert all(torch.equal(p, theta[n] * 3.0) for n, p in m.unet.named_parameters() if n in theta)


def test_several_concepts_one_drawn_per_step(tiny_sd, vocab, tmp_path):
    erase.main(["--model", tiny_sd, "--concept", "church, garbage truck, parachute", "--steps", "8",
                "--method", "esd", "--ddim_steps", "4", "--out", str(tmp_path), "--device", "cpu"])
    drawn = {json.loads(line)["c_e"] for line in open(tmp_path / "log.jsonl")}
    assert len(drawn) >= 2 and drawn <= {"church", "garbage truck", "parachute"}


@pytest.mark.parametrize("method", ["eap", "uce"])
def test_the_result_loads_into_a_diffusers_pipeline(tiny_sd, vocab, tmp_path, method):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    path = run(tiny_sd, vocab, tmp_path, "--lr", "1e-2", "--method", method)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, output_type="np", generator=None)
    before = pipe("garbage truck", latents=torch.ones(1, 4, 8, 8), **kw).images
    result = pipe.unet.load_state_dict(load_file(path), strict=False)
    assert result.unexpected_keys == []
    after = pipe("garbage truck", latents=torch.ones(1, 4, 8, 8), **kw).images
    assert abs(after - before).max() > 0
    if method == "uce":  # the closed form: keys and values of cross-attention only, defaults recorded
        assert set(load_file(path)) == {n for n, _ in pipe.unet.named_parameters() if n.endswith(uce.EDITED)}
        config = json.load(open(tmp_path / "config.json"))
        assert (config["uce_lambda"], config["erase_scale"], config["preserve_scale"]) == (0.5, 1.0, 1.0)
        assert "lr" not in config and len(open(tmp_path / "log.jsonl").readlines()) == 1


def test_resume_finishes_with_the_same_weights(tiny_sd, vocab, tmp_path, monkeypatch):
    flags = ["--steps", "6", "--save_every", "2", "--method", "eap"]
    whole = load_file(run(tiny_sd, vocab, tmp_path / "whole", *flags))

    undo = dies_at_update(monkeypatch, 5)  # killed after the checkpoint at step 4
    with pytest.raises(KeyboardInterrupt):
        run(tiny_sd, vocab, tmp_path / "cut", *flags)
    undo()
    assert not (tmp_path / "cut" / "weights.safetensors").exists()
    assert (tmp_path / "cut" / checkpoint.RESUME).exists()
    (tmp_path / "cut" / (checkpoint.RESUME + ".tmp")).write_bytes(b"half a file")  # never read
    resumed = load_file(run(tiny_sd, vocab, tmp_path / "cut", *flags, "--resume"))
    assert set(resumed) == set(whole) and all(torch.equal(resumed[n], whole[n]) for n in whole)
    def log(run):  # the same lines but for the wall time of each update
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in open(tmp_path / run / "log.jsonl")]
    assert log("cut") == log("whole") and len(log("whole")) == 6
    assert not (tmp_path / "cut" / checkpoint.RESUME).exists()
    with pytest.raises(UsageError, match="no checkpoint"):
        run(tiny_sd, vocab, tmp_path / "cut", *flags, "--resume")


def test_resume_refuses_other_settings(tiny_sd, vocab, tmp_path, monkeypatch):
    dies_at_update(monkeypatch, 2)
    flags = ["--steps", "4", "--save_every", "1", "--method", "esd"]
    with pytest.raises(KeyboardInterrupt):
        run(tiny_sd, vocab, tmp_path, *flags)
    with pytest.raises(UsageError, match="other settings than the checkpoint's: lr"):
        run(tiny_sd, vocab, tmp_path, *flags, "--resume", "--lr", "0.5")


def test_a_fresh_run_refuses_to_delete_an_unfinished_runs_checkpoint(tiny_sd, vocab, tmp_path, monkeypatch):
    undo = dies_at_update(monkeypatch, 2)
    flags = ["--steps", "4", "--save_every", "1", "--method", "esd"]
    with pytest.raises(KeyboardInterrupt):
        run(tiny_sd, vocab, tmp_path, *flags)
    undo()
    with pytest.raises(UsageError, match="unfinished run: add --resume"):
        run(tiny_sd, vocab, tmp_path, *flags)
    assert (tmp_path / checkpoint.RESUME).exists()  # still there to resume from


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_the_ascent_moves_pi(tiny_sd, vocab, tmp_path, optim, monkeypatch):
    """pi after 2 updates, read from the checkpoint: the printed eta 1e-3 moves it under plain
    ascent too, because sgd ascends the squared norm (a sum), not the mean over elements."""
    from safetensors import safe_open
    dies_at_update(monkeypatch, 3)  # stopped after the checkpoint of update 2
    with pytest.raises(KeyboardInterrupt):
        run(tiny_sd, vocab, tmp_path, "--steps", "3", "--save_every", "2", "--pi_optim", optim,
            "--eta", "1e-3", "--lr", "1e-2", "--soft")
    with safe_open(str(tmp_path / checkpoint.RESUME), "pt") as f:
        pi = f.get_tensor("pi.0")
    # measured: sgd 1.8e-5 (the mean's gradient: 256x less, 7e-8); Adam ~eta a step, 1.4e-3
    assert pi.abs().max() > (1e-6 if optim == "sgd" else 1e-4), pi


@pytest.mark.parametrize("extra,message", [
    (["--concept", ""], "empty"),
    (["--concept", "church, , parachute"], "empty"),
    (["--model", "/no/such/folder"], "does not exist"),
    (["--method", "ablate"], "invalid choice"),
    (["--method", "ca", "--concept", "church"], "needs --anchor: 'church' is one word"),
    (["--method", "ca", "--anchor", "a, b"], "--anchor has 2 items"),
    (["--method", "ca", "--negative_guidance", "1"], "ESD's target"),
    (["--train_method", "attn"], "invalid choice"),
    (["--K", "50"], "larger than the vocabulary"),
    (["--method", "fixed"], "needs --preserve"),
    (["--vocab", "/no/such/vocab.txt"], "does not exist"),
    (["--lr", "1e30", "--method", "esd", "--steps", "4"], "loss became"),
])
def test_bad_input_is_one_clear_line(tiny_sd, vocab, tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        run(tiny_sd, vocab, tmp_path / "out", *extra)
    assert not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "out")) \
        if (tmp_path / "out").exists() else True


def test_not_a_diffusers_folder_and_empty_vocab(tiny_sd, vocab, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        run(tiny_sd, vocab, tmp_path / "out", "--vocab", str(tmp_path / "empty.txt"))
    with pytest.raises(UsageError, match="not a diffusers folder"):
        run(tiny_sd, vocab, tmp_path / "out", "--model", str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_on_stderr_and_exits_2(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "erase.py"), "--concept", "  ",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith("error: --concept is empty") and not (tmp_path / "o").exists()
