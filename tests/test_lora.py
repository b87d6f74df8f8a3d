"""Erasure into a LoRA adapter (lora.py, erase.py --lora_rank) and export.py: the adapter starts
at theta and trains alone, the frozen model is the UNet with the adapter off, the files load into
diffusers' own pipelines (diffusers' and kohya's format) with the training UNet's outputs, every
trained method on every family, resume, the SVD export, and what is refused."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import erase
import export
import family
import lora
import params
from cli import UsageError

FAMILIES = ["sd1", "sd2-v", "sdxl"]


def run(model, vocab, out, *flags, m=None):
    argv = ["--model", model, "--concept", "garbage truck", "--steps", "2", "--K", "4", "--vocab", vocab,
            "--ddim_steps", "3", "--lr", "1e-2", "--device", "cpu", "--seed", "1",
            "--cache_dir", os.path.join(os.path.dirname(vocab), "cache"), "--out", str(out), *flags]
    return erase.main(argv, m=m)


def outputs(m, seed=0):
    """eps of m at a fixed z, t and prompt: what a loaded adapter must reproduce."""
    g = torch.Generator().manual_seed(seed)
    cfg = m.unet.config
    z = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    with torch.no_grad():
        return family.eps(m, z, torch.tensor([100, 700]), family.encode(m, ["garbage truck", "a church"]))


def test_the_adapter_starts_at_theta_trains_alone_and_switches_off_for_eps_theta(tiny_sd, vocab, tmp_path):
    """With B = 0 the first update is the full run's first update (the same draws: the same L1,
    L2 = 0); training moves only the adapter, the base weights stay theta; with the adapter off
    the UNet is the original model (eps_theta), with it on it is not."""
    full = [json.loads(line) for line in open(os.path.dirname(run(tiny_sd, vocab, tmp_path / "full")) + "/log.jsonl")]
    m = family.load_model(tiny_sd, vae=False)
    base = {n: p.detach().clone() for n, p in m.unet.named_parameters()}
    before = outputs(m)
    path = run(tiny_sd, vocab, tmp_path / "lora", "--lora_rank", "4", "--lora_dtype", "fp32", m=m)
    log = [json.loads(line) for line in open(tmp_path / "lora" / "log.jsonl")]
    assert log[0]["l2"] == full[0]["l2"] == 0 and abs(log[0]["l1"] - full[0]["l1"]) <= 1e-6 * full[0]["l1"]
    assert log[1]["l2"] > 0  # the adapter moved theta' away from theta
    trained = {n for n, p in m.unet.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    for n, p in m.unet.named_parameters():  # the base layers are theta, to the bit
        if ".lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n
    with lora.disabled(m.unet):
        assert torch.equal(outputs(m), before)
    assert not torch.allclose(outputs(m), before, atol=1e-4)
    assert os.path.basename(path) == lora.FILE and sorted(os.listdir(tmp_path / "lora")) == \
        ["config.json", "log.jsonl", lora.FILE]


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_the_file_loads_into_diffusers_with_the_training_unets_outputs(tiny_kind, vocab, tmp_path, kind, fmt):
    """pipe.load_lora_weights(file) (diffusers' format, or kohya's through diffusers' kohya
    loader): the pipeline's UNet gives the training UNet's outputs to fp32 rounding, alpha = 8
    with r = 4 included (without the metadata a loader would assume alpha = r)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    folder = tiny_kind(kind)
    m = family.load_model(folder, vae=False)
    path = run(folder, vocab, tmp_path, "--method", "esd", "--lora_rank", "4", "--lora_alpha", "8",
               "--lora_dtype", "fp32", "--lora_format", fmt, m=m)
    trained = outputs(m)
    Pipe = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = Pipe.from_pretrained(folder, **({} if kind == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)))
    pipe.load_lora_weights(path)
    theirs = family.load_model(folder, vae=False)
    theirs.unet = pipe.unet
    assert torch.allclose(outputs(theirs), trained, rtol=1e-5, atol=1e-6)
    ours = family.load_model(folder, vae=False)  # and through our own loader (sample.py, attack.py)
    params.load_weights(ours, path)
    assert torch.allclose(outputs(ours), trained, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("method,flags", [("eap", []), ("age", ["--tau", "0.1"]), ("fixed", ["--preserve", "road"]),
                                          ("pgd", ["--method", "eap", "--search", "pgd"]),
                                          ("esd", ["--train_method", "xattn-strict"]),
                                          ("ca", ["--train_method", "noxattn", "--ca_images", "4"])])
def test_every_trained_method_writes_a_loadable_adapter(tiny_kind, vocab, tmp_path, kind, method, flags):
    """Every trained method on every family: an adapter on the modules --train_method names
    (xattn-strict: to_k and to_v; noxattn: Linear and Conv2d layers outside attn2) that loads and
    changes the model's outputs; the file says which family and method made it."""
    folder = tiny_kind(kind)
    flags = flags if "--method" in flags else ["--method", method, *flags]
    path = run(folder, vocab, tmp_path, *flags, "--lora_rank", "2")
    keys = {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in load_file(path)}
    if "xattn-strict" in flags:
        assert {k.rsplit(".", 1)[1] for k in keys} == {"to_k", "to_v"}
    elif "noxattn" in flags:
        assert not any("attn2" in k for k in keys) and any(k.startswith("conv_in") for k in keys)
    else:
        assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[1] for k in keys} >= {"attn2.to_q", "attn2.to_k"}
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["family"] == family.load_model(folder, vae=False).family and meta["lora_rank"] == "2"
    m = family.load_model(folder, vae=False)
    before = outputs(m)
    params.load_weights(m, path)
    assert (outputs(m) - before).abs().max() > 1e-5


def test_fp16_files_are_small_and_close_to_fp32(tiny_sd, vocab, tmp_path):
    """The default file is fp16: half the tensor bytes of fp32 (the tiny file is mostly peft's
    config), and outputs within fp16's rounding of the adapter (relative 1e-3 of its effect)."""
    m32, m16 = family.load_model(tiny_sd, vae=False), family.load_model(tiny_sd, vae=False)
    p32 = run(tiny_sd, vocab, tmp_path / "32", "--lora_rank", "4", "--lora_dtype", "fp32")
    p16 = run(tiny_sd, vocab, tmp_path / "16", "--lora_rank", "4")
    assert {v.dtype for v in load_file(p16).values()} == {torch.float16}
    nbytes = [sum(v.numel() * v.element_size() for v in load_file(p).values()) for p in (p16, p32)]
    assert 2 * nbytes[0] == nbytes[1]
    base = outputs(m32)
    params.load_weights(m32, p32)
    params.load_weights(m16, p16)
    effect = (outputs(m32) - base).abs().max()
    assert (outputs(m16) - outputs(m32)).abs().max() <= 1e-3 * effect + 1e-6


def test_resume_finishes_with_the_same_adapter(tiny_sd, vocab, tmp_path, monkeypatch):
    flags = ["--steps", "4", "--save_every", "2", "--lora_rank", "2", "--lora_dtype", "fp32"]
    whole = load_file(run(tiny_sd, vocab, tmp_path / "whole", *flags))
    real, calls = erase.L1, []

    def dies(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(erase, "L1", dies)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_sd, vocab, tmp_path / "cut", *flags)
    monkeypatch.setattr(erase, "L1", real)
    resumed = load_file(run(tiny_sd, vocab, tmp_path / "cut", *flags, "--resume"))
    assert set(resumed) == set(whole) and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_export_turns_a_full_delta_into_an_adapter_by_svd(tiny_sd, tmp_path, capsys):
    """A rank-2 delta exported at rank 2 is exact; UCE's edit (full rank) loses less as the rank
    grows and is exact at the layers' width; each layer's error and the file size are printed."""
    m = family.load_model(tiny_sd, vae=False)
    W = {n: p.detach() for n, p in m.unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_q.weight"))}
    g = torch.Generator().manual_seed(0)
    low = {n: w + 0.1 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
           for n, w in W.items()}
    save_file(low, str(tmp_path / "low.safetensors"), metadata={"model": tiny_sd, "family": "sd1"})
    res = export.main(["lora", str(tmp_path / "low.safetensors"), "--rank", "2", "--dtype", "fp32",
                       "--out", str(tmp_path / "low")])
    assert max(res["errors"].values()) < 1e-5
    out = capsys.readouterr().out
    assert "relative error" in out and '"bytes"' in out
    full = family.load_model(tiny_sd, vae=False)
    params.load_weights(full, str(tmp_path / "low.safetensors"))
    adapted = family.load_model(tiny_sd, vae=False)
    params.load_weights(adapted, res["path"])
    assert torch.allclose(outputs(adapted), outputs(full), atol=1e-5)
    uce = erase.main(["--model", tiny_sd, "--concept", "garbage truck", "--method", "uce", "--device", "cpu",
                      "--out", str(tmp_path / "uce")])
    errs = [max(export.main(["lora", uce, "--rank", str(r), "--dtype", "fp32", "--out", str(tmp_path / f"r{r}")]
                            )["errors"].values()) for r in (1, 8, 32)]
    assert errs[0] > errs[1] > 1e-3 and errs[2] < 1e-6
    kohya = export.main(["kohya", str(tmp_path / "r8" / lora.FILE)])["path"]
    via_kohya, direct = family.load_model(tiny_sd, vae=False), family.load_model(tiny_sd, vae=False)
    params.load_weights(via_kohya, kohya)
    params.load_weights(direct, str(tmp_path / "r8" / lora.FILE))
    assert torch.allclose(outputs(via_kohya), outputs(direct), atol=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--lora_rank", "-1"], "at least 1"),
    (["--lora_rank", "33"], "narrowest adapted layer's width"),
    (["--lora_rank", "4", "--method", "uce"], "closed-form full edit"),
    (["--lora_rank", "4", "--lora_alpha", "0"], "above 0"),
])
def test_bad_adapter_settings_are_one_line_and_write_nothing(tiny_sd, vocab, tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        run(tiny_sd, vocab, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists() or not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "out"))


def test_adapters_and_full_deltas_in_the_wrong_place(tiny_kind, vocab, tmp_path):
    adapter = run(tiny_kind("sd1"), vocab, tmp_path / "a", "--lora_rank", "2")
    full = run(tiny_kind("sd1"), vocab, tmp_path / "f")
    with pytest.raises(UsageError, match="made for an sd1 model; this one is sdxl"):
        params.load_weights(family.load_model(tiny_kind("sdxl"), vae=False), adapter)
    with pytest.raises(UsageError, match="already a LoRA adapter"):
        export.main(["lora", adapter, "--rank", "2", "--out", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="is a full delta, not a LoRA adapter"):
        export.main(["kohya", full, "--out", str(tmp_path / "y")])
    with pytest.raises(UsageError, match="is a LoRA adapter, not the full delta"):
        params.checked_weights(family.load_model(tiny_kind("sd1"), vae=False), adapter)
    bare = {k: v for k, v in load_file(adapter).items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))  # no family in the metadata: the shapes tell
    with pytest.raises(UsageError, match="does not fit this UNet"):
        params.load_weights(family.load_model(tiny_kind("sdxl"), vae=False), str(tmp_path / "bare.safetensors"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_readme_lora_commands(tiny_sd, tmp_path, monkeypatch):
    """The LoRA page's commands (docs/lora.md), reduced: erase.py into an adapter (diffusers', kohya's) on the
    tiny model, export.py from a full delta and to kohya's format, the toy benchmark at a rank
    (one split and seed, two updates), and the diffusers line."""
    import re
    import shlex
    import benchmark
    from diffusers import StableDiffusionPipeline
    from test_readme import section
    text = section("LoRA adapters")
    cmds = [shlex.split(line, comments=True)[1:] for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for line in block.splitlines() if line.startswith("python ")]
    assert {c[0] for c in cmds} == {"erase.py", "export.py", "benchmark.py"}
    monkeypatch.chdir(tmp_path)
    os.makedirs("out")
    erase.main(["--model", tiny_sd, "--concept", "garbage truck", "--method", "esd", "--steps", "1",
                "--ddim_steps", "2", "--device", "cpu", "--out", "out"])  # out/weights.safetensors
    for c in cmds:
        if c[0] == "erase.py":
            erase.main(c[1:] + ["--model", tiny_sd, "--method", "esd", "--steps", "1", "--ddim_steps", "2",
                                "--device", "cpu"])
        elif c[0] == "export.py":
            export.main(c[1:] + (["--model", tiny_sd] if c[1] == "lora" else []))
        else:
            r = benchmark.main(c[1:] + ["--splits", "red circle, blue square", "--seeds", "0", "--jobs", "1",
                                        "--samples", "1", "--sample_steps", "3", "--erase_steps", "2",
                                        "--ddim_steps", "2", "--K", "4", "--n_iter", "1", "--min_accuracy", "0"])
            assert list(r["methods"]) == ["esd", "eap"] and r["settings"]["lora_rank"] == int(c[c.index("--lora_rank") + 1])
    for f in ("out/lora/pytorch_lora_weights.safetensors", "out/kohya/lora_kohya.safetensors",
              "out/exported/pytorch_lora_weights.safetensors", "out/kohya-export/lora_kohya.safetensors"):
        assert os.path.isfile(f), f
    line = re.search(r"pipe\.load_lora_weights\(.*\)", text).group(0)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    exec(line, {"pipe": pipe})
    assert any(".lora_" in n for n, _ in pipe.unet.named_parameters())
