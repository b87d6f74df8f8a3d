"""The toy world (toy.py): its pictures, its oracle, its model, and a reduced benchmark run end
to end through erase.py on the committed toy model. Every command of the README's toy section
runs here, reduced."""
import csv
import json
import os
import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import erase
import evaluate
import sample
import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: two torch threads per process thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_world_draws_each_concept_and_captions_it():
    rng = np.random.default_rng(0)
    x, caps, labels = toy.world_batch(rng, 256)
    assert x.shape == (256, 3, toy.SIZE, toy.SIZE) and x.min() >= -1 and x.max() <= 1
    assert labels.shape == (256, 2) and set(labels[:, 0].tolist()) == set(range(6))
    assert "" in caps and any(c.startswith("a ") for c in caps)
    for cap, (c, s) in zip(caps, labels.tolist()):  # a caption never names what is not there
        words = set(cap.split()) - {"a", "shape"}
        unrelated = len(words) == 1 and words <= set(toy.UNRELATED)
        assert words <= {list(toy.COLOURS)[c], toy.SHAPES[s]} or unrelated
    assert any(c in toy.UNRELATED for c in caps)  # words that say nothing about the picture
    assert len(toy.CONCEPTS) == 36 and toy.shares_word("red square", ["red circle"])
    assert not toy.shares_word("green star", ["red circle", "blue square"])


def test_vocab_file_is_the_world_vocabulary():
    words = open(toy.VOCAB).read().split("\n")[:-1]
    assert words == toy.vocabulary()
    assert {"red", "circle", "red circle", "dog"} <= set(words) and len(words) == len(set(words))


def test_oracle_reads_held_out_clean_images():
    net = toy.load_oracle()
    assert toy.held_out_accuracy(net, seed=12345, n_per_concept=40) >= 99.0
    rng = np.random.default_rng(7)  # and it names what it sees, class by class
    images = [toy.draw(c, s, rng) for c in toy.COLOURS for s in toy.SHAPES]
    assert (toy.recognise(net, images) == np.arange(36)).all()
    # as evaluate.py's classifier: 36 log-probabilities that sum to 1, the same top-1
    scores = toy.Concepts(net)(torch.stack([toy.to_tensor(im) for im in images]))
    assert scores.shape == (36, 36) and torch.allclose(scores.exp().sum(1), torch.ones(36), atol=1e-5)
    assert (scores.argmax(1) == torch.arange(36)).all()
    # the test can fail: an untrained judge is far from 99%
    torch.manual_seed(0)
    assert toy.held_out_accuracy(toy.oracle_net().eval(), seed=12345, n_per_concept=10) < 50


def test_committed_model_draws_what_it_is_asked():
    m = sample.load_model("toy")
    assert m.vae is None and m.unet.config.in_channels == 3 and m.unet.config.sample_size == toy.SIZE
    assert len(m.tokenizer) == 49408
    prompts = [f"a {c}" for c in toy.CONCEPTS]
    imgs = sample.generate(m, prompts, [0] * 36, guidance=7.5, steps=20, batch=36, progress=False)
    acc = np.mean(toy.recognise(toy.load_oracle(), imgs) == np.arange(36))
    assert acc >= 0.85, acc


def readme_toy_commands():
    """The commands of the README's toy section, paths under out/ and prompts/ kept relative."""
    text = open(os.path.join(ROOT, "README.md")).read()
    text = text[text.index("\n## A toy world"):]
    text = text[:text.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [shlex.split(line, comments=True)[1:] for b in blocks
            for line in b.replace("\\\n", " ").splitlines() if line.startswith("python ")]


def into(tmp_path, argv):
    """The README's outputs (out/..., prompts/...) written under tmp_path instead."""
    return [str(tmp_path / a) if a.startswith(("out/", "prompts/")) else a for a in argv]


def test_readme_toy_commands_train_deterministically(tmp_path):
    """`python toy.py train`, `oracle` and `vocab` as the README gives them, 2 steps, train twice."""
    cmds = {c[1]: c[2:] for c in readme_toy_commands() if c[0] == "toy.py"}
    assert set(cmds) == {"train", "oracle", "vocab", "benchmark"}
    for run in ("a", "b"):
        toy.main(["train", *cmds["train"], "--steps", "2", "--batch", "8", "--out", str(tmp_path / run)])
    wa = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    m = sample.load_model(str(tmp_path / "a"))  # a diffusers folder like any SD checkpoint
    assert m.vae is None and m.scheduler.config.beta_schedule == "scaled_linear"
    info = json.load(open(tmp_path / "a" / "train.json"))
    assert np.isfinite(info["final_loss"]) and info["steps"] == 2
    acc = toy.main(["oracle", *cmds["oracle"], "--steps", "2", "--out", str(tmp_path / "oracle.safetensors")])
    assert 0 <= acc <= 100 and os.path.isfile(tmp_path / "oracle.safetensors")
    toy.main(["vocab", *cmds["vocab"], "--out", str(tmp_path / "vocab.txt")])
    assert open(tmp_path / "vocab.txt").read() == open(toy.VOCAB).read()


def test_readme_toy_commands_erase_sample_evaluate(tmp_path, monkeypatch):
    """The README's erase.py / sample.py / evaluate.py commands with --model toy, in order, with
    2 erasure steps, 3 DDIM steps and 1 seed; esr-psr reads the PNGs as the benchmark does."""
    monkeypatch.chdir(ROOT)  # toy/vocab.txt, as the README's reader runs it
    cmds = [into(tmp_path, c) for c in readme_toy_commands() if c[0] != "toy.py"]
    assert {c[0] for c in cmds} == {"erase.py", "sample.py", "evaluate.py"}
    for c in cmds:
        if c[0] == "erase.py":
            erase.main(c[1:] + ["--steps", "2", "--ddim_steps", "2", "--K", "4"])
        elif c[0] == "sample.py":
            sample.main(c[1:] + ["--steps", "3"] + ([] if "--csv" in c else ["--seeds", "0"]))
        elif c[1] == "prompts":
            evaluate.main(c[1:] + ["--seeds", "1"])
        else:
            res = evaluate.main(c[1:] + ["--device", "cpu"])
    folder = c[2]  # the last command: esr-psr on the erased model's images
    rows = list(csv.DictReader(open(os.path.join(folder, "prompts.csv"))))
    images = [np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png"))) for i in range(len(rows))]
    assert len(rows) == 36 and images[0].shape == (toy.SIZE, toy.SIZE, 3)
    hit = toy.recognise(toy.load_oracle(), images) == np.arange(36)
    erased = [toy.CONCEPTS.index(e.strip()) for e in c[c.index("--erased") + 1].split(",")]
    keep = [i for i in range(36) if i not in erased]
    assert res["ESR-1"] == pytest.approx(100 * (1 - hit[erased].mean()), abs=0.01)
    assert res["PSR-1"] == pytest.approx(100 * hit[keep].mean(), abs=0.01)


def test_readme_benchmark_reduced_end_to_end(tmp_path):
    """`python toy.py benchmark --out out/toy`: 2 erasure steps, 1 sample per concept, 5 DDIM steps."""
    (argv,) = [into(tmp_path, c[2:]) for c in readme_toy_commands() if c[:2] == ["toy.py", "benchmark"]]
    reduced = ["--samples", "1", "--sample_steps", "5", "--erase_steps", "2", "--ddim_steps", "2",
               "--K", "4", "--n_iter", "1"]
    with pytest.raises(sample.UsageError, match="too weak"):  # the check of the original model
        toy.main(["benchmark", *argv, *reduced, "--out", str(tmp_path / "weak"), "--min_accuracy", "101"])
    with pytest.raises(sample.UsageError, match="--methods"):
        toy.main(["benchmark", *argv, *reduced, "--out", str(tmp_path / "bad"), "--methods", "esd,uce"])
    toy.main(["benchmark", *argv, *reduced, "--min_accuracy", "0"])
    out = tmp_path / argv[argv.index("--out") + 1]
    r = json.load(open(out / "results.json"))
    assert 0 <= r["original"]["accuracy"] <= 100
    assert list(r["methods"]) == ["esd", "fixed_empty", "fixed_related", "eap", "age"]
    for name, v in r["methods"].items():
        assert 0 <= v["esr1"] <= 100 and 0 <= v["psr1"] <= 100, name
        assert -100 <= v["drop_shared"] <= 100 and -100 <= v["drop_unshared"] <= 100
        assert os.path.isfile(out / name / "weights.safetensors")
        config = json.load(open(out / name / "config.json"))  # the benchmark's settings reach erase.py
        assert config["negative_guidance"] == r["settings"]["negative_guidance"] == 1.0
        assert config["lr"] == r["settings"]["lr"] and config["steps"] == 2
    assert r["methods"]["fixed_empty"]["c_a_most_often"] == [""]
    assert r["methods"]["eap"]["c_a_most_often"][0] in toy.vocabulary()
    for f in ("grid.png", "sensitivity.png", "table.md"):
        assert (out / f).stat().st_size > 0
