"""evaluate.py: each metric's arithmetic on a case with a known answer; every subcommand end to
end on small folders with random-weight networks (offline); every command of docs/evaluation.md; bad input."""
import csv
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
import metrics
import family
import prompts
import sample
import sensitivity
from cli import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_folder(folder, rows, images=None, seed=0):
    """The layout of `sample.py --csv`: prompts.csv + {row:05d}.png (random 64x64 by default)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(folder, "prompts.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for i in range(len(rows)):
        x = images[i] if images is not None else rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(x).save(os.path.join(folder, f"{i:05d}.png"))
    return folder


def imagenette_rows(classes, seeds=1):
    return [{"prompt": f"Image of {c}", "seed": s, "class": c, "class_index": ev.IMAGENETTE[c]}
            for c in classes for s in range(seeds)]


# ---------------------------------------------------------------- prompt sets

def test_imagenette_indices_are_torchvision_categories():
    from torchvision.models import ResNet50_Weights
    names = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    assert sorted(ev.IMAGENETTE.values()) == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    for c, i in ev.IMAGENETTE.items():
        assert names[i].lower() == c
    rows = prompts.prompts_imagenette(3)
    assert len(rows) == 30 and rows[0] == {"prompt": "Image of tench", "seed": 0, "class": "tench",
                                           "class_index": 0}


def test_prompt_sets(tmp_path):
    rows = prompts.prompts_artists(None, 5)
    assert {r["artist"] for r in rows} == set(prompts.ARTISTS) and len(prompts.ARTISTS) == 5
    assert len(rows) == 5 * sum(len(p) for p in prompts.ARTISTS.values())
    i2p = tmp_path / "i2p.csv"
    i2p.write_text("prompt,categories,evaluation_seed,evaluation_guidance,case_number\n"
                   "a,sexual,42,7,11\n\"b, c\",violence,7.0,8,12\n")
    assert prompts.prompts_i2p(str(i2p)) == [
        {"prompt": "a", "seed": 42, "guidance": 7.0, "case_number": "11"},
        {"prompt": "b, c", "seed": 7, "guidance": 8.0, "case_number": "12"}]
    assert {r["guidance"] for r in prompts.prompts_i2p(str(i2p), 7.5)} == {7.5}
    rows = prompts.prompts_concepts("a photo, person", 3, 2)
    assert [r["prompt"] for r in rows[:4]] == ["a photo", "a photo", "person", "person"]
    assert len(rows) == 2 * 5 and all(r["prompt"].replace(" ", "").isalpha() for r in rows)


def test_published_prompt_files(tmp_path):
    """EAP's long_niche_art_prompts.csv: 5 images a row, the j-th from the j-th latent of one
    batch seeded with the row's evaluation_seed (sample j); Fig. 1's similarity-nudity*_200.csv:
    one image a row, its concept label_str, several files at once; a seed that is not a number:
    one line."""
    art = tmp_path / "long_niche_art_prompts.csv"
    art.write_text("case_number,prompt,evaluation_seed,artist\n0,\"A castle, by X\",3,X\n1,A sea,7,Y\n")
    rows = prompts.prompts_artists(str(art), 5)
    assert len(rows) == 10 and [r["sample"] for r in rows[:5]] == [0, 1, 2, 3, 4]
    assert {(r["prompt"], r["seed"], r["artist"]) for r in rows[:5]} == {("A castle, by X", 3, "X")}
    f1, f2 = tmp_path / "s1.csv", tmp_path / "s2.csv"
    f1.write_text("case_number,prompt,label_str,evaluation_seed\n0,women,women,3990\n1,women,women,11\n")
    f2.write_text("case_number,prompt,label_str,evaluation_seed\n0,a photo,a photo,5\n")
    rows = prompts.prompts_concepts(None, 0, 1, f"{f1}, {f2}")
    assert [(r["prompt"], r["seed"], r["concept"], r["sample"]) for r in rows] == [
        ("women", 3990, "women", 0), ("women", 11, "women", 0), ("a photo", 5, "a photo", 0)]
    f2.write_text("case_number,prompt,label_str,evaluation_seed\n0,a photo,a photo,x5\n")
    with pytest.raises(UsageError, match="evaluation_seed must be a whole number"):
        prompts.prompts_concepts(None, 0, 1, str(f2))
    # two images of one row and seed are told apart by `sample` when two folders are paired
    rows = [dict(prompt="p", seed="3", sample="0"), dict(prompt="p", seed="3", sample="1")]
    assert ev.pair_rows(rows, rows[::-1]) == [1, 0]


# ---------------------------------------------------------------- Table 1

def test_published_splits_and_their_average(tmp_path, monkeypatch):
    """--erased imagenette_v2_wo names the second published split; `average` gives Table 1's
    mean and (population) std over the splits' results."""
    folder = write_folder(str(tmp_path / "f"), imagenette_rows(["tench", "church"], seeds=1))
    logits = torch.zeros(2, 1000)
    logits[:, 0] = 9  # both images read as tench
    monkeypatch.setattr(ev, "load_classifier", lambda name, device: (
        Stub(logits), __import__("torchvision").models.ResNet50_Weights.IMAGENET1K_V2.transforms()))
    res = ev.main(["esr-psr", folder, "--erased", "imagenette_v2_wo", "--json", str(tmp_path / "v2.json")])
    assert res["erased"] == ["chain saw", "gas pump", "tench", "english springer", "golf ball"]
    assert (res["ESR-1"], res["PSR-1"]) == (0.0, 0.0)  # tench not erased by the model; church lost
    other = dict(json.load(open(tmp_path / "v2.json")), **{"ESR-1": 100.0, "PSR-1": 50.0})
    json.dump(other, open(tmp_path / "v1.json", "w"))
    avg = ev.main(["average", str(tmp_path / "v1.json"), str(tmp_path / "v2.json")])
    assert avg["ESR-1"] == dict(mean=50.0, std=50.0, n=2) and avg["PSR-1"] == dict(mean=25.0, std=25.0, n=2)
    with pytest.raises(UsageError, match="esr-psr"):
        json.dump(dict(command="clip"), open(tmp_path / "c.json", "w"))
        ev.main(["average", str(tmp_path / "c.json")])


def test_esr_psr_arithmetic():
    # 4 images of an erased class (569), 4 of a preserved one (0); top-5 lists made by hand
    topk = torch.tensor([[569, 1, 2, 3, 4],      # erased, found at rank 1
                         [1, 2, 569, 3, 4],      # erased, found at rank 3
                         [1, 2, 3, 4, 5],        # erased, gone
                         [1, 2, 3, 4, 5],        # erased, gone
                         [0, 1, 2, 3, 4],        # preserved, rank 1
                         [1, 2, 3, 4, 0],        # preserved, rank 5
                         [1, 2, 3, 4, 5],        # preserved, lost
                         [5, 6, 7, 8, 9]])       # preserved, lost
    labels = torch.tensor([569] * 4 + [0] * 4)
    erased = torch.tensor([True] * 4 + [False] * 4)
    assert metrics.esr_psr(topk, labels, erased) == {"ESR-1": 75.0, "ESR-5": 50.0, "PSR-1": 25.0, "PSR-5": 50.0}


class Stub(torch.nn.Module):
    """A classifier whose logits are fixed by construction: row i of `logits` for the i-th image."""
    def __init__(self, logits):
        super().__init__()
        self.logits, self.seen = logits, 0

    def forward(self, x):
        out = self.logits[self.seen:self.seen + len(x)]
        self.seen += len(x)
        return out


def test_esr_psr_with_stub_classifier(tmp_path, monkeypatch):
    folder = write_folder(str(tmp_path / "f"), imagenette_rows(["church", "tench"], seeds=3))
    logits = torch.zeros(6, 1000)
    logits[0, 497] = 9             # church image 0: top-1 church -> not erased
    logits[1, 497] = 1             # church image 1: church in the top-5 only
    logits[1, :4] = 5
    logits[2, 10] = 9              # church image 2: no church
    logits[3, 0] = 9               # tench image 0: top-1 tench
    logits[4, 100:110] = 5         # tench images 1, 2: no tench in the top-5
    logits[5, 200:210] = 5
    monkeypatch.setattr(ev, "load_classifier", lambda name, device: (
        Stub(logits), __import__("torchvision").models.ResNet50_Weights.IMAGENET1K_V2.transforms()))
    res = ev.main(["esr-psr", folder, "--erased", "Church", "--batch", "4",
                   "--json", str(tmp_path / "r.json")])
    assert (res["ESR-1"], res["ESR-5"], res["PSR-1"], res["PSR-5"]) == (66.67, 33.33, 33.33, 33.33)
    assert res["per_class"]["church"]["ESR-1"] == 66.67 and res["per_class"]["church"]["PSR-1"] is None
    assert json.load(open(tmp_path / "r.json"))["erased"] == ["church"]


# ---------------------------------------------------------------- Table 2 / Fig. 5

def test_ner_and_body_parts_counting():
    d = lambda c, s: {"class": c, "score": s, "box": [0, 0, 1, 1]}  # noqa: E731
    detections = [[d("FEMALE_BREAST_EXPOSED", 0.6)],
                  [d("ANUS_EXPOSED", 0.95), d("FACE_FEMALE", 0.9), d("BELLY_COVERED", 0.9)],  # not counted
                  [d("FEET_EXPOSED", 0.85), d("BELLY_EXPOSED", 0.4)],
                  []]
    assert metrics.ner(detections) == {"NER-0.3": 50.0, "NER-0.5": 50.0, "NER-0.7": 25.0, "NER-0.8": 25.0}
    parts = metrics.body_parts(detections, 0.5)
    assert parts["FEMALE_BREAST_EXPOSED"] == 1 and parts["FEET_EXPOSED"] == 1 and sum(parts.values()) == 2
    assert metrics.body_parts(detections, 0.3)["BELLY_EXPOSED"] == 1
    twice = [[d("FEMALE_BREAST_EXPOSED", 0.7), d("FEMALE_BREAST_EXPOSED", 0.6)], [d("FEMALE_BREAST_EXPOSED", 0.9)]]
    assert metrics.body_parts(twice)["FEMALE_BREAST_EXPOSED"] == 3  # per detection, as EAP's notebook
    assert metrics.body_parts(twice, per="image")["FEMALE_BREAST_EXPOSED"] == 2


def test_exposed_labels_are_nudenets():
    import nudenet.nudenet as nn
    labels = set(getattr(nn, "__labels"))
    exposed = {x for x in labels if x.endswith("_EXPOSED")}
    assert set(metrics.EXPOSED) == exposed - {"ANUS_EXPOSED"} and len(metrics.EXPOSED) == 8


# ---------------------------------------------------------------- Table 4 / Section 3.2

def test_clip_score_known_cosines():
    img = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0], [2.0, 0.0]])
    txt = torch.tensor([[1.0, 1.0], [4.0, 3.0], [-1.0, 0.0], [0.0, 5.0]])
    s = metrics.clip_score(img, txt)  # cos = 1/sqrt(2), 24/25, -1 (-> 0), 0
    assert torch.allclose(s, torch.tensor([100 / 2 ** 0.5, 96.0, 0.0, 0.0]))


def test_clip_embeddings_match_clipmodel_logits(tmp_path):
    """Our score equals CLIPModel's own logits_per_image / exp(logit_scale), clamped at 0."""
    rows = [{"prompt": p, "seed": 0} for p in ["a red car", "a dog", "a church", "night city"]]
    folder = write_folder(str(tmp_path / "f"), rows)
    clip = metrics.load_clip("random", "cpu")
    paths = [os.path.join(folder, f"{i:05d}.png") for i in range(4)]
    texts = [r["prompt"] for r in rows]
    ours = metrics.clip_score(*metrics.clip_embeddings(clip, paths, texts, batch=3))
    model, tok, proc = clip
    t = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t.input_ids, attention_mask=t.attention_mask,
                    pixel_values=proc(images=[metrics.load(p) for p in paths], return_tensors="pt").pixel_values)
    ref = 100 * (out.logits_per_image.diagonal() / model.logit_scale.exp()).clamp(min=0)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_sensitivity_delta_known_scores():
    rows = [{"prompt": c, "seed": s} for c in ["person", "road"] for s in range(3)]
    s_orig = torch.tensor([30.0, 32.0, 34.0, 20.0, 20.0, 20.0])
    s_erased = torch.tensor([20.0, 22.0, 30.0, 21.0, 20.0, 22.0])
    # delta(person) = (10 + 10 + 4) / 3 = 8; delta(road) = (-1 + 0 - 2) / 3 = -1
    assert metrics.sensitivity(rows, s_orig, s_erased) == pytest.approx({"person": 8.0, "road": -1.0})


def test_similarity_known_embeddings():
    rows = [{"prompt": c, "seed": s} for c in ["person", "road"] for s in range(3)]
    e_orig = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    e_erased = torch.tensor([[5.0, 0.0], [0.0, 1.0], [6.0, 8.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    # person: the same directions, cos 1; road: cos 0, 1/sqrt(2), -1
    assert metrics.similarity(rows, e_orig, e_erased) == pytest.approx(
        {"person": 1.0, "road": (0 + 2 ** -0.5 - 1) / 3})


def test_fig2_histogram_is_similarity_not_delta(tmp_path, monkeypatch):
    """Fig. 2's caption: the histogram is of the similarity between the two models' outputs per
    concept (CLIP image-image cosine, mean over seeds), not of delta (Fig. 1's bars)."""
    concepts = ["person", "road", "a photo"]
    rows = [{"prompt": c, "seed": s} for c in concepts for s in range(3)]
    rng = np.random.default_rng(0)
    orig = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in rows]
    # "person": the same images in both folders; "road": grey squares; "a photo": other noise
    erased = orig[:3] + [np.full((64, 64, 3), 60 * s, np.uint8) for s in range(3)] + \
        [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    a = write_folder(str(tmp_path / "sd"), rows, orig)
    b = write_folder(str(tmp_path / "eap"), rows[::-1], erased[::-1])  # paired by prompt and seed
    plotted, real_plot = {}, ev.plot

    def spy(path, kind, labels, values, title, **kw):  # what main hands to the plot, per kind
        plotted[kind] = list(values)
        return real_plot(path, kind, labels, values, title, **kw)
    monkeypatch.setattr(ev, "plot", spy)
    res = ev.main(["sensitivity", "--original", a, "--sanitized", b, "--clip_model", "random",
                   "--device", "cpu", "--batch", "4", "--json", str(tmp_path / "s.json")])
    sim = json.load(open(tmp_path / "s.json"))["similarity"]
    assert sim["person"] == pytest.approx(1.0, abs=1e-6)
    assert res["delta"]["person"] == pytest.approx(0, abs=1e-4)
    assert sim["road"] < 1 - 1e-4 and sim["a photo"] < 1 - 1e-4
    assert sorted(sim.values()) != pytest.approx(sorted(res["delta"].values()))  # the test tells them apart
    assert list(sim) == sorted(sim, key=sim.get)  # most changed concept first
    figs = ev.sensitivity_figures(res["delta"], res["similarity"])
    assert sorted(figs["hist"][2]) == pytest.approx(sorted(sim.values()))
    assert figs["bars"][1] == list(res["delta"]) and figs["bars"][2] == list(res["delta"].values())
    assert sorted(plotted["hist"]) == pytest.approx(sorted(sim.values()))  # what main plots
    assert plotted["barh"] == pytest.approx(list(res["delta"].values()))
    assert all(os.path.isfile(p) for p in res["plots"])


def test_lpips_identical_folders_is_zero(tmp_path):
    rows = [{"prompt": "p", "seed": s} for s in range(3)]
    a = write_folder(str(tmp_path / "a"), rows, seed=0)
    b = write_folder(str(tmp_path / "b"), rows, seed=1)
    net = metrics.load_lpips("random", "cpu")
    pa = [os.path.join(a, f"{i:05d}.png") for i in range(3)]
    pb = [os.path.join(b, f"{i:05d}.png") for i in range(3)]
    assert torch.all(metrics.lpips_distances(net, pa, pa, batch=2) == 0)
    assert torch.all(metrics.lpips_distances(net, pa, pb, batch=2) > 0)


# ---------------------------------------------------------------- FID

def test_frechet_distance_known_gaussians():
    """Inception weights cannot be had offline: the Frechet distance itself is pinned here,
    || mu1 - mu2 ||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); for diagonal S: sum (sqrt a - sqrt b)^2."""
    from cleanfid.fid import frechet_distance
    d = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([4.0, 1.0]))
    assert d == pytest.approx(5 + (1 - 2) ** 2 + (2 - 1) ** 2)


def test_fid_of_folder_with_itself(tmp_path):
    rows = [{"prompt": "p", "seed": s} for s in range(12)]
    a = write_folder(str(tmp_path / "a"), rows, seed=0)
    grey = [np.full((64, 64, 3), 40 + 10 * i, np.uint8) for i in range(12)]
    b = write_folder(str(tmp_path / "b"), rows, grey)
    pa, pb = ev.fid_images(a), ev.fid_images(b)
    assert abs(metrics.fid(pa, pa, "random")) < 1e-6
    assert metrics.fid(pa, pb, "random") > 1e-3
    # on folders with nothing else in them: what clean-fid's compute_fid gives
    from cleanfid.fid import compute_fid
    assert metrics.fid(pa, pb, "random", batch=5) == pytest.approx(compute_fid(
        a, b, mode="clean", custom_feat_extractor=metrics.fid_features("random", "cpu"), batch_size=5,
        device=torch.device("cpu"), num_workers=0, verbose=False), rel=1e-6)


def stray_images(folder, grey=255):
    """What clean-fid's recursive glob would also score: a leftover sample.py temporary, a
    subfolder's image."""
    stray = Image.fromarray(np.full((64, 64, 3), grey, np.uint8))
    stray.save(os.path.join(folder, "00001.png.tmp.png"))
    os.makedirs(os.path.join(folder, "old"), exist_ok=True)
    stray.save(os.path.join(folder, "old", "00000.png"))


def test_fid_scores_exactly_the_listed_images(tmp_path):
    rows = [{"prompt": "p", "seed": s} for s in range(12)]
    a = write_folder(str(tmp_path / "a"), rows, seed=0)
    b = write_folder(str(tmp_path / "b"), rows, seed=0)  # the same 12 images
    os.remove(os.path.join(b, "prompts.csv"))            # a plain reference folder (COCO images)
    stray_images(a, 255)
    stray_images(b, 0)
    res = ev.main(["fid", a, "--reference", b, "--features", "random", "--device", "cpu",
                   "--json", str(tmp_path / "fid.json")])
    assert abs(res["fid"]) < 1e-6  # the strays are not scored: the same images, FID 0
    saved = json.load(open(tmp_path / "fid.json"))
    assert (saved["n_images"], saved["n_reference"]) == (12, 12)
    res = ev.main(["fid", a, "--reference", b, "--features", "random", "--n_reference", "12"])
    assert res["n_reference"] == 12


def test_fid_refuses_wrong_image_counts(tmp_path):
    rows = [{"prompt": "p", "seed": s} for s in range(4)]
    a = write_folder(str(tmp_path / "a"), rows, seed=0)
    b = write_folder(str(tmp_path / "b"), rows, seed=1)
    stray_images(b)
    one = write_folder(str(tmp_path / "one"), rows[:1], seed=2)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    stray_images(empty)  # only strays: nothing to score
    args = ["--features", "random", "--device", "cpu"]
    with pytest.raises(ev.UsageError, match=r"has 4 images, --n_reference says 5"):
        ev.main(["fid", a, "--reference", b, "--n_reference", "5"] + args)
    with pytest.raises(ev.UsageError, match=r"FID needs at least 2 images; .*one has 1"):
        ev.main(["fid", one, "--reference", b] + args)
    with pytest.raises(ev.UsageError, match=r"FID needs at least 2 images; .*empty has 0"):
        ev.main(["fid", a, "--reference", empty] + args)
    os.remove(os.path.join(a, "00002.png"))
    with pytest.raises(ev.UsageError, match=r"1 of 4 images missing"):
        ev.main(["fid", a, "--reference", b] + args)


# ---------------------------------------------------------------- every subcommand, end to end

def test_each_subcommand_end_to_end(tmp_path):
    out = str(tmp_path)
    classes = ["church", "tench", "garbage truck"]
    obj = write_folder(f"{out}/obj", imagenette_rows(classes))
    art_rows = [{"prompt": p[0], "seed": 0, "artist": a} for a, p in prompts.ARTISTS.items()]
    art = write_folder(f"{out}/art", art_rows, seed=1)
    art_sd = write_folder(f"{out}/art_sd", art_rows[::-1], seed=2)  # rows are matched, not by order
    runs = {
        "esr-psr": ["esr-psr", obj, "--erased", "church, garbage truck", "--classifier", "random"],
        "nudity": ["nudity", obj],
        "clip": ["clip", art, "--erased", "Kelly McKernan", "--clip_model", "random"],
        "lpips": ["lpips", art, "--original", art_sd, "--erased", "Kelly McKernan", "--lpips_net", "random"],
        "fid": ["fid", art, "--reference", obj, "--features", "random"],
        "sensitivity": ["sensitivity", "--original", art_sd, "--sanitized", art, "--clip_model", "random"],
    }
    for name, argv in runs.items():
        ev.main(argv + ["--device", "cpu", "--json", f"{out}/{name}.json"])
    r = {n: json.load(open(f"{out}/{n}.json")) for n in runs}
    assert r["esr-psr"]["n_images"] == 3 and set(r["esr-psr"]["per_class"]) == set(classes)
    assert all(0 <= r["esr-psr"][k] <= 100 for k in ["ESR-1", "ESR-5", "PSR-1", "PSR-5"])
    assert r["esr-psr"]["ESR-5"] <= r["esr-psr"]["ESR-1"] and r["esr-psr"]["PSR-1"] <= r["esr-psr"]["PSR-5"]
    assert set(r["nudity"]) >= {"NER-0.3", "NER-0.5", "NER-0.7", "NER-0.8", "parts_at_0_5"}
    assert len(r["nudity"]["detections"]) == 3 and os.path.isfile(r["nudity"]["plot"])
    assert set(r["clip"]["groups"]) == {"all", "erase", "retain"} | set(prompts.ARTISTS)
    assert r["clip"]["groups"]["erase"]["n"] == 1 and r["clip"]["groups"]["retain"]["n"] == 4
    assert all(0 <= s <= 100 for s in r["clip"]["scores"]) and max(r["clip"]["scores"]) > 0
    assert all(s > 0 for s in r["lpips"]["scores"]) and r["lpips"]["groups"]["all"]["n"] == 5
    assert r["fid"]["fid"] > -1e-6  # random-noise folders: equal statistics, FID ~ 0
    assert (r["fid"]["n_images"], r["fid"]["n_reference"]) == (5, 3)
    assert set(r["sensitivity"]["delta"]) == {x["prompt"] for x in art_rows} and r["sensitivity"]["k"] == 1
    assert any(d != 0 for d in r["sensitivity"]["delta"].values())
    assert set(r["sensitivity"]["similarity"]) == set(r["sensitivity"]["delta"])
    assert all(-1 <= s < 1 for s in r["sensitivity"]["similarity"].values())
    assert all(os.path.isfile(p) for p in r["sensitivity"]["plots"])


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,artist\n")
    obj = write_folder(str(tmp_path / "obj"), imagenette_rows(["church"]))
    cases = {"does not exist": ["nudity", str(tmp_path / "missing")],
             "no data rows": ["prompts", "artists", "--file", str(empty), "--out", str(tmp_path / "o.csv")],
             "unknown class 'zebra'": ["esr-psr", obj, "--erased", "church, zebra", "--classifier", "random"],
             "FID needs at least 2 images": ["fid", obj, "--reference", obj, "--features", "random"]}
    procs = {msg: subprocess.Popen([sys.executable, os.path.join(ROOT, "evaluate.py")] + argv, cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for msg, argv in cases.items()}  # started together: each spends its time importing torch
    for msg, p in procs.items():
        _, err = p.communicate()
        assert p.returncode == 2, err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- the README commands

# appended to each README command: same code, small scale, random networks, tiny SD
SMALL = {"prompts": ["--seeds", "1"], "esr-psr": ["--classifier", "random"],
         "nudity": [], "clip": ["--clip_model", "random"], "lpips": ["--lpips_net", "random"],
         "fid": ["--features", "random"], "sensitivity": ["--clip_model", "random"], "average": []}


def readme_commands():
    from test_readme import section
    text = section("Evaluation")  # the Evaluation page (docs/evaluation.md) alone
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [shlex.split(line) for b in blocks for line in b.replace("\\\n", " ").splitlines()
            if line.startswith(("python sample.py ", "python evaluate.py ", "python sensitivity.py "))]  # erase.py's: test_readme


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """tiny32(kind): a tiny random folder of that family that makes 32x32 images (LPIPS' AlexNet
    needs more than 16x16)."""
    import offline
    built = {}

    def folder(kind):
        if kind not in built:
            built[kind] = offline.save_random_pipeline(str(tmp_path_factory.mktemp(f"{kind}32")),
                                                       cfg=offline.configs(kind, latent=16))
        return built[kind]
    return folder


@pytest.mark.parametrize("kind", ["sd1", "sd2-v", "sdxl"])
def test_readme_commands(tmp_path, monkeypatch, tiny32, kind):
    """Every sample.py and evaluate.py command of the Evaluation page, on a tiny model of each
    family in SD-1.4's place (the same commands with --model FOLDER)."""
    tiny_sd32 = tiny32(kind)
    cmds = readme_commands()
    assert {c[2] for c in cmds if c[1] == "evaluate.py"} >= set(SMALL) and any(c[1] == "sensitivity.py" for c in cmds)
    monkeypatch.chdir(tmp_path)
    # the inputs the README asks the user to supply: I2P CSV, COCO prompts and images, erase.py weights
    open("i2p_benchmark.csv", "w").write("prompt,evaluation_seed,evaluation_guidance,case_number\n"
                                         "a painting of a beach,1,7,0\na portrait,2,7,1\n")
    write_folder("coco_val2014_30k", [{"prompt": f"photo {i}", "seed": i} for i in range(4)])
    with open("coco30k.csv", "w") as f:
        f.write("prompt,seed\n" + "".join(f"a photo of a street {i},{i}\n" for i in range(4)))
    m = family.load_model(tiny_sd32)
    for path in {c[c.index("--weights") + 1] for c in cmds if "--weights" in c}:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        from safetensors.torch import save_file
        save_file({n: p + 0.1 * torch.randn_like(p) for n, p in m.unet.named_parameters() if "attn2" in n},
                  path)
    for c in cmds:
        if c[1] == "sample.py":
            sample.main(c[2:] + ["--model", tiny_sd32, "--steps", "1", "--batch", "16"])
        elif c[1] == "sensitivity.py":  # a small vocabulary in --vocab clip's place
            open("words.txt", "w").write("truck\ncar\nperson\n")
            sensitivity.main(c[2:] + ["--model", tiny_sd32, "--vocab", "words.txt", "--device", "cpu"])
        else:
            small = ["--words", "2", "--concepts", "a photo, person"] if "concepts" in c else []
            ev.main(c[2:] + SMALL[c[2]] + small)
    results = [c[c.index("--json") + 1] for c in cmds if "--json" in c]
    assert results and all(os.path.isfile(r) for r in results)


def test_clip_score_resizes_as_published(tmp_path, monkeypatch):
    """--clip_resize published (EAP's Table 4): the uint8 image, shorter side resized to the CLIP
    input by torchvision's antialiased bilinear resize, then scaled and normalised; what reaches
    the model differs from the processor's own PIL bicubic resize of the 64 px image."""
    from torchvision.transforms.functional import pil_to_tensor, resize
    folder = write_folder(str(tmp_path / "f"), [{"prompt": "a red car", "seed": 0}])
    path = os.path.join(folder, "00000.png")
    model, tok, proc = clip = metrics.load_clip("random", "cpu")
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: seen.append(kw["pixel_values"]) or forward(**kw))
    for mode in ("published", "processor"):
        img, txt = metrics.clip_embeddings(clip, [path], ["a red car"], resize=mode)
        assert not img.requires_grad and not txt.requires_grad  # scoring builds no graph
    small = resize(pil_to_tensor(metrics.load(path)), 32, antialias=True).float() / 255  # uint8 first
    mean, std = torch.tensor(proc.image_mean)[:, None, None], torch.tensor(proc.image_std)[:, None, None]
    assert torch.allclose(seen[0][0], (small - mean) / std, atol=1e-5)
    assert (seen[0] - seen[1]).abs().max() > 1e-2
