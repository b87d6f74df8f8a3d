"""The toy world (toy.py): its pictures, its oracle, its model, and a reduced benchmark run end
to end through erase.py on the committed toy model. Every command of the toy world's
documentation (the README's toy section and docs/toy.md) runs here, reduced."""
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

import benchmark
import erase
import evaluate
import family
import oracle
import sample
import tables
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
    net = oracle.load_oracle()
    assert toy.held_out_accuracy(net, seed=12345, n_per_concept=40) >= 99.0
    rng = np.random.default_rng(7)  # and it names what it sees, class by class
    images = [toy.draw(c, s, rng) for c in toy.COLOURS for s in toy.SHAPES]
    assert (oracle.recognise(net, images) == np.arange(36)).all()
    # as evaluate.py's classifier: 36 log-probabilities that sum to 1, the same top-1
    scores = oracle.Concepts(net)(torch.stack([oracle.to_tensor(im) for im in images]))
    assert scores.shape == (36, 36) and torch.allclose(scores.exp().sum(1), torch.ones(36), atol=1e-5)
    assert (scores.argmax(1) == torch.arange(36)).all()
    # the test can fail: an untrained judge is far from 99%
    torch.manual_seed(0)
    assert toy.held_out_accuracy(toy.oracle_net().eval(), seed=12345, n_per_concept=10) < 50


def test_committed_model_draws_what_it_is_asked():
    m = family.load_model("toy")
    assert m.vae is None and m.unet.config.in_channels == 3 and m.unet.config.sample_size == toy.SIZE
    assert len(m.tokenizer) == 49408
    prompts = [f"a {c}" for c in toy.CONCEPTS]
    imgs = sample.generate(m, prompts, [0] * 36, guidance=7.5, steps=20, batch=36, progress=False)
    acc = np.mean(oracle.recognise(oracle.load_oracle(), imgs) == np.arange(36))
    assert acc >= 0.85, acc


def readme_toy_commands():
    """The commands of the README's toy section and docs/toy.md, paths under out/ and prompts/
    kept relative."""
    from test_readme import section
    text = section("A toy world")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [shlex.split(line, comments=True)[1:] for b in blocks
            for line in b.replace("\\\n", " ").splitlines() if line.startswith("python ")]


def into(tmp_path, argv):
    """The README's outputs (out/..., prompts/...) written under tmp_path instead."""
    return [str(tmp_path / a) if a.startswith(("out/", "prompts/")) else a for a in argv]


def test_readme_toy_commands_train_deterministically(tmp_path):
    """`python toy.py train`, `oracle` and `vocab` as the README gives them, 2 steps, train twice."""
    cmds = {c[1]: c[2:] for c in readme_toy_commands() if c[0] == "toy.py"}
    assert set(cmds) == {"train", "oracle", "vocab"}
    for run in ("a", "b"):
        toy.main(["train", *cmds["train"], "--steps", "2", "--batch", "8", "--out", str(tmp_path / run)])
    wa = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    m = family.load_model(str(tmp_path / "a"))  # a diffusers folder like any SD checkpoint
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
    cmds = [into(tmp_path, c) for c in readme_toy_commands() if c[0] not in ("toy.py", "benchmark.py")]
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
    hit = oracle.recognise(oracle.load_oracle(), images) == np.arange(36)
    erased = [toy.CONCEPTS.index(e.strip()) for e in c[c.index("--erased") + 1].split(",")]
    keep = [i for i in range(36) if i not in erased]
    assert res["ESR-1"] == pytest.approx(100 * (1 - hit[erased].mean()), abs=0.01)
    assert res["PSR-1"] == pytest.approx(100 * hit[keep].mean(), abs=0.01)


def test_readme_benchmark_reduced_end_to_end(tmp_path):
    """`python benchmark.py --model toy --out out/toy`, every method on the first split and seed, in this
    process: 2 erasure steps, 1 sample per concept, 5 DDIM steps."""
    (argv,) = [into(tmp_path, c[1:]) for c in readme_toy_commands() if c[0] == "benchmark.py"]
    reduced = ["--samples", "1", "--sample_steps", "5", "--erase_steps", "2", "--ddim_steps", "2",
               "--K", "4", "--n_iter", "1", "--splits", "red circle, blue square", "--seeds", "0", "--jobs", "1"]
    with pytest.raises(sample.UsageError, match="too weak"):  # the check of the original model
        benchmark.main([*argv, *reduced, "--out", str(tmp_path / "weak"), "--min_accuracy", "101"])
    with pytest.raises(sample.UsageError, match="--methods"):
        benchmark.main([*argv, *reduced, "--out", str(tmp_path / "bad"), "--methods", "esd,nope"])
    benchmark.main([*argv, *reduced, "--min_accuracy", "0"])
    out = tmp_path / argv[argv.index("--out") + 1]
    r = json.load(open(out / "results.json"))
    assert 0 <= r["original"]["accuracy"] <= 100
    assert list(r["methods"]) == ["esd", "fixed_empty", "fixed_related", "eap", "age", "uce", "ca"]
    for v in r["runs"]:
        name = v["method"]
        assert 0 <= v["esr1"] <= 100 and 0 <= v["psr1"] <= 100, name
        assert -100 <= v["drop_shared"] <= 100 and -100 <= v["drop_unshared"] <= 100
        assert os.path.isfile(out / "split0_seed0" / name / "weights.safetensors")
        config = json.load(open(out / "split0_seed0" / name / "config.json"))  # the settings reach erase.py
        assert config["method"] == {"fixed_empty": "fixed", "fixed_related": "fixed"}.get(name, name)
        if name in benchmark.ESD_TARGET:  # ESD's target, negative guidance included; ca refuses it
            assert config["negative_guidance"] == r["settings"]["negative_guidance"] == 1.0
        if name != "uce":  # uce trains nothing
            assert config["lr"] == r["settings"]["lr"] and config["steps"] == 2
    runs = {v["method"]: v for v in r["runs"]}
    assert runs["fixed_empty"]["c_a_most_often"] == [""]
    assert runs["fixed_related"]["c_a_most_often"] == ["blue circle"]
    assert runs["eap"]["c_a_most_often"][0] in toy.vocabulary()
    assert set(runs["ca"]["c_a_most_often"]) <= {"circle", "square"}  # ca: each concept's anchor
    assert r["verdict"]["pairs"] == 1 and r["verdict"]["text"] in open(out / "table.md").read()
    for f in ("grid.png", "sensitivity.png", "table.md"):
        assert (out / f).stat().st_size > 0
    from PIL import Image
    w, h = Image.open(out / "grid.png").size
    assert w < 1000 and h > 8 * 64  # methods as rows (the original and 7), at a width a README shows


def test_a_stopped_benchmark_started_again_redoes_only_what_was_left(tmp_path, monkeypatch):
    """Stopped after its first run, started again: the second start runs only the other one, and
    the results equal an uninterrupted run's; a changed setting on the same --out is refused."""
    argv = ["--model", "toy", "--samples", "1", "--sample_steps", "5", "--erase_steps", "2", "--ddim_steps", "2",
            "--splits", "red circle, blue square", "--seeds", "0", "--jobs", "1", "--min_accuracy", "0",
            "--methods", "esd,uce"]
    whole = benchmark.main([*argv, "--out", str(tmp_path / "whole")])
    real, calls = benchmark.erase_and_read, []

    def counted(job, stop_after=None):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(job["method"])
        return real(job)
    monkeypatch.setattr(benchmark, "erase_and_read", lambda job: counted(job, stop_after=1))
    with pytest.raises(KeyboardInterrupt):
        benchmark.main([*argv, "--out", str(tmp_path / "stopped")])
    assert calls == ["esd"]  # the longest first
    monkeypatch.setattr(benchmark, "erase_and_read", counted)
    again = benchmark.main([*argv, "--out", str(tmp_path / "stopped")])
    assert calls == ["esd", "uce"]  # esd was read from its folder
    drop = ("seconds", "erase_seconds", "folder")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again["runs"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in whole["runs"]]
    with pytest.raises(sample.UsageError, match="other settings"):
        benchmark.main([*argv, "--out", str(tmp_path / "stopped"), "--lr", "1e-3"])


def test_two_processes_under_torchrun_split_the_runs_and_agree_with_one(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU): each run made once, by one of the two ranks,
    and the table's runs equal one process's."""
    import glob
    import subprocess
    import sys
    argv = ["--model", "toy", "--samples", "1", "--sample_steps", "5", "--erase_steps", "2", "--ddim_steps", "2",
            "--splits", "red circle, blue square", "--seeds", "0", "--jobs", "1", "--min_accuracy", "0",
            "--methods", "esd,uce"]
    one = benchmark.main([*argv, "--out", str(tmp_path / "one")])
    root = os.path.dirname(os.path.abspath(benchmark.__file__))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "benchmark.py", *argv, "--out", str(tmp_path / "two")], cwd=root, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    made = [json.load(open(f))["rank"] for f in glob.glob(str(tmp_path / "two" / "*" / "*" / "result.json"))]
    assert sorted(made) == [0, 1]  # two runs, one on each rank
    two = json.load(open(tmp_path / "two" / "results.json"))
    drop = ("seconds", "erase_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in two["runs"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in one["runs"]]


def hand_made_runs(esd, eap):
    """Runs of esd and eap on (split, seed) = (0, 0), (1, 0), (2, 0) with the given PSR-1s."""
    return [dict(method=name, split=i, seed=0, esr1=100.0 - i, psr1=p, drop_shared=10.0 * i,
                 drop_unshared=5.0, erase_seconds=20.0)
            for name, psr1 in (("esd", esd), ("eap", eap)) for i, p in enumerate(psr1)]


def test_mean_std_and_verdict_on_hand_made_runs():
    """Table 1's mean ± std: the sample std (n - 1: 10 here, not 8.16), over each method's runs;
    the verdict: EAP's mean PSR-1 beats ESD's by more than the larger std, or not."""
    runs = hand_made_runs(esd=[30.0, 40.0, 50.0], eap=[50.0, 52.0, 54.0])
    agg = tables.aggregate(runs)
    assert list(agg) == ["esd", "eap"] and agg["esd"]["runs"] == 3
    assert agg["esd"]["psr1"] == dict(mean=40.0, std=10.0, values=[30.0, 40.0, 50.0])
    assert agg["eap"]["psr1"] == dict(mean=52.0, std=2.0, values=[50.0, 52.0, 54.0])
    assert agg["esd"]["esr1"] == dict(mean=99.0, std=1.0, values=[100.0, 99.0, 98.0])
    assert agg["esd"]["drop_unshared"]["std"] == 0.0 and agg["eap"]["drop_shared"]["mean"] == 10.0
    assert tables.mean_std([7.0]) == dict(mean=7.0, std=0.0, values=[7.0])  # one run: no spread
    v = tables.verdict(runs, agg)  # gap 12 > 10
    assert v["eap_beats_esd_beyond_spread"] is True and v["psr1_gap"] == 12.0 and v["spread"] == 10.0
    assert v["paired_difference"] == dict(mean=12.0, std=8.0, values=[20.0, 12.0, 4.0])
    assert v["eap_higher_in"] == 3 and v["pairs"] == 3 and v["text"].startswith("EAP's PSR-1 beats")
    runs = hand_made_runs(esd=[30.0, 40.0, 50.0], eap=[45.0, 41.0, 49.0])  # gap 5 <= 10
    v = tables.verdict(runs, tables.aggregate(runs))
    assert v["eap_beats_esd_beyond_spread"] is False and v["eap_higher_in"] == 2
    assert v["text"].startswith("EAP's PSR-1 does not beat")
    assert tables.verdict(runs[:3], tables.aggregate(runs[:3])) is None  # no eap: no verdict
    r = dict(original=dict(splits=3, esr1=tables.mean_std([0, 0, 0]), psr1=tables.mean_std([90, 92, 94])),
             methods=agg, splits=[dict(E=["red circle", "blue square"])] * 3, seeds=[0], seconds=1,
             verdict=tables.verdict(hand_made_runs([30.0, 40.0, 50.0], [50.0, 52.0, 54.0]), agg))
    table = tables.markdown_table(r)
    assert "| esd | 3 | 99.0 ± 1.0 | 40.0 ± 10.0 | 10.0 ± 10.0 | 5.0 ± 0.0 | 20 s |" in table
    assert "| original | 3 | 0.0 ± 0.0 | 92.0 ± 2.0 | - | - | - |" in table
    assert r["verdict"]["text"] in table


def test_fixed_related_concept_is_derived_per_split():
    """fixed_related's c_a: the shape of a split's first concept in the colour of its second, as
    "blue circle" for the default E; and only ESD's-target methods get --negative_guidance."""
    args = benchmark.parse_args(["--out", "x"])
    splits = benchmark.parse_splits(args.splits)
    assert [s["E"] for s in splits] == [["red circle", "blue square"], ["green star", "orange heart"],
                                        ["purple cross", "yellow triangle"]]
    assert [s["related"] for s in splits] == ["blue circle", "orange star", "yellow cross"]
    for a in toy.CONCEPTS:
        for b in toy.CONCEPTS:
            if set(a.split()) & set(b.split()):
                continue
            c = benchmark.related_concept([a, b])
            assert c.split() == [b.split()[0], a.split()[1]] and c not in (a, b)
    for s in splits:
        flags = benchmark.methods(args, s["related"])
        assert flags["fixed_related"][flags["fixed_related"].index("--preserve") + 1] == s["related"]
    assert benchmark.parse_splits("red circle", related=False) == [dict(E=["red circle"], related=None)]
    assert [n for n, f in flags.items() if "--negative_guidance" in f] == list(benchmark.ESD_TARGET)
    assert "--steps" not in flags["uce"] and "--lr" not in flags["uce"]


@pytest.mark.parametrize("flags, message", [
    (["--splits", "red circle, pink circle"], "'pink circle' is not a concept"),
    (["--splits", "red circle, blue square;"], "'' is not a concept"),
    (["--splits", "red circle, blue square; green star, green star"], "'green star' appears twice"),
    (["--splits", "red circle, red square"], "would be 'red circle', an erased concept"),
    (["--splits", "red circle, blue circle"], "would be 'blue circle', an erased concept"),
    (["--splits", "red circle"], "has one concept"),
    (["--seeds", "0", "0"], "--seeds names a seed twice"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--methods", "esd,esd"], "--methods"),
])
def test_bad_splits_are_refused_in_one_line(tmp_path, flags, message):
    """Refused before any model is loaded, as one line (cli.UsageError). Were one let through,
    the original model's check (a tiny sampling) would refuse it with another message."""
    fast = ["--samples", "1", "--sample_steps", "2", "--min_accuracy", "101"]
    with pytest.raises(sample.UsageError, match=re.escape(message)) as e:
        benchmark.main(["--out", str(tmp_path), *fast, *flags])
    assert "\n" not in str(e.value)


def test_benchmark_splits_and_seeds_end_to_end(tmp_path):
    """2 splits x 1 seed x 2 methods in 2 worker processes: results.json keeps every run and
    each method's mean ± std; the splits reach erase.py (their numbers differ); a run gives the
    same numbers in a worker as in this process."""
    tiny = ["--samples", "1", "--sample_steps", "5", "--erase_steps", "3", "--lr", "1e-2",
            "--ddim_steps", "2", "--seeds", "0", "--min_accuracy", "0"]
    splits = ["red circle, blue square", "green star, orange heart"]
    r = benchmark.main(["--out", str(tmp_path / "a"), "--splits", "; ".join(splits), "--jobs", "2",
                  "--methods", "esd,fixed_related", *tiny])
    assert r == json.load(open(tmp_path / "a" / "results.json"))
    assert [s["related"] for s in r["splits"]] == ["blue circle", "orange star"] and r["seeds"] == [0]
    assert [(v["split"], v["seed"], v["method"]) for v in r["runs"]] == [
        (0, 0, "esd"), (0, 0, "fixed_related"), (1, 0, "esd"), (1, 0, "fixed_related")]
    for v in r["runs"]:
        config = json.load(open(tmp_path / "a" / v["folder"] / "config.json"))
        assert config["concept"] == splits[v["split"]] and config["seed"] == v["seed"] == 0
        if v["method"] == "fixed_related":
            assert config["preserve"] == v["c_a"] == r["splits"][v["split"]]["related"]
        assert len(v["per_concept"]) == 36
    for name in ("esd", "fixed_related"):
        agg, runs = r["methods"][name], [v for v in r["runs"] if v["method"] == name]
        assert agg["runs"] == 2 and set(agg) == {"runs", *tables.FIGURES}
        for f in tables.FIGURES:
            values = [v[f] for v in runs]
            assert agg[f]["values"] == values
            assert agg[f]["mean"] == pytest.approx(np.mean(values), abs=0.01)
            assert agg[f]["std"] == pytest.approx(np.std(values, ddof=1), abs=0.01)
        assert runs[0]["per_concept"] != runs[1]["per_concept"]  # two splits, two erased models
        assert [runs[0][f] for f in tables.FIGURES[:4]] != [runs[1][f] for f in tables.FIGURES[:4]]
    assert r["verdict"] is None  # no eap in this run
    assert "±" in open(tmp_path / "a" / "table.md").read()
    # the second split alone, esd alone, in this process: the same numbers as in the worker
    b = benchmark.main(["--out", str(tmp_path / "b"), "--splits", splits[1], "--jobs", "1",
                  "--methods", "esd", *tiny])
    assert b["runs"][0]["per_concept"] == r["runs"][2]["per_concept"]
