"""benchmark.py --table (protocol.py, runner.py): each table's plan is the published protocol the
documentation gives as commands; a stopped run started again does only what was left and ends
with the same table; a changed setting is refused, or made again with what reads it; each
documented --table command runs end to end on a tiny random model (CPU, random-weight judges)."""
import json
import os

import pytest

import erase
import protocol
import runner
import sample
from cli import UsageError
from test_readme import readme_commands

SD14 = "CompVis/stable-diffusion-v1-4"
V1 = "cassette player, church, garbage truck, parachute, french horn"


def plan(tmp_path, *extra):
    args = protocol.parse_args(["--model", SD14, "--out", str(tmp_path / "out"), *extra])
    return protocol.plan(args)


def by(stages, kind):
    return [s for s in stages if s["kind"] == kind]


def flag(s, name):
    return s["argv"][s["argv"].index(name) + 1]


def erase_settings(argv):
    """What an erasure computes: erase.py's parsed flags less where it writes and runs."""
    return {k: v for k, v in vars(erase.parse_args(argv)).items() if k not in ("out", "model", "device")}


def documented(concept):
    """The documentation's erase.py commands for this --concept, by method (eap: erase.py's default)."""
    out = {}
    for argv in readme_commands("erase.py"):
        if "--concept" in argv and argv[argv.index("--concept") + 1] == concept:
            out[erase.parse_args(argv).method] = erase_settings(argv)
    return out


@pytest.mark.parametrize("table,concept,tag", [("1", V1, "imagenette_v1_wo"), ("2", "nudity", "nudity"),
                                               ("4", "Kelly McKernan", "kelly_mckernan")])
def test_the_plans_erasures_are_the_documented_commands(table, concept, tag, tmp_path):
    """Every method's erasure in the plan computes what the documentation's command for that
    table computes (flag by flag, as erase.py parses them): one command per table reproduces the
    commands typed by hand."""
    i2p = tmp_path / "i2p.csv"
    i2p.write_text("prompt,evaluation_seed\na,1\n")
    stages = {s["name"]: s for s in plan(tmp_path, "--table", table, "--i2p", str(i2p))}
    docs = documented(concept)
    assert len(docs) >= 4 and set(docs) <= set(protocol.ERASURES[table])
    for method, settings in docs.items():
        s = stages[f"erase/{tag}/{method}"]
        assert flag(s, "--concept") == concept
        assert erase_settings(s["argv"]) == settings, method


def test_table_1_plan(tmp_path, capsys):
    """Table 1: "Image of {class}" x 500 seeds, the original model's 5,000 images made once for
    the four published splits, CompVis DDIM 100 steps, ResNet-50, each split scored with its own
    erased classes, then averaged; --dry_run prints it with its GPU-hours."""
    stages = plan(tmp_path, "--table", "1")
    assert [s["argv"][:2] for s in by(stages, "prompts")] == [["prompts", "imagenette"]]
    gens = by(stages, "sample")
    assert len(gens) == 1 + 4 * 5 and all(s["images"] == 5000 for s in gens)
    assert {(flag(s, "--scheduler"), flag(s, "--steps")) for s in gens} == {("ddim-ldm", "100")}
    assert sum("--weights" not in s["argv"] for s in gens) == 1  # the original model's, shared
    scores = [s for s in by(stages, "score") if s["argv"][0] == "esr-psr"]
    assert len(scores) == 4 * 6 and {flag(s, "--classifier") for s in scores} == {"resnet50"}
    for s in scores:  # a split's erased models are scored on that split
        w = [g for g in gens if g["argv"][g["argv"].index("--out_dir") + 1] == s["argv"][1]][0]
        split = flag(s, "--erased")
        assert "--weights" not in w["argv"] or f"/erase/{split}/" in flag(w, "--weights")
    assert len([s for s in by(stages, "score") if s["argv"][0] == "average"]) == 6
    capsys.readouterr()
    res = protocol.main(["--table", "1", "--model", SD14, "--out", str(tmp_path / "out"), "--dry_run"])
    text = capsys.readouterr().out
    assert "500 seeds" in text and "ddim-ldm" in text and "105,000 images" in text and res["hours"] > 10
    assert "GPU-hours" in text and not os.path.exists(tmp_path / "out" / "stages")


def test_tables_2_4_fig1_attacks_plans(tmp_path):
    """Table 2: I2P at guidance 7.5 with LMS, NudeNet, FID against COCO-30K's 30,000 images;
    Table 4: LMS, one model per artist and method, LPIPS against the original model's images;
    Fig. 1: the published concepts x 200 seeds, CompVis DDIM, "nudity" erased with Table 2's ESD-u
    and "garbage truck" with each preservation; the attack table on Table 2's erasures."""
    i2p, coco = tmp_path / "i2p.csv", tmp_path / "coco.csv"
    i2p.write_text("prompt,evaluation_seed,evaluation_guidance\na,1,9\nb,2,9\n")
    coco.write_text("prompt,seed\nc,0\n")
    t2 = plan(tmp_path, "--table", "2", "--i2p", str(i2p), "--coco", str(coco), "--coco_reference", "ref")
    assert by(t2, "prompts")[0]["argv"][-4:-2] == ["--guidance", "7.5"]
    assert {flag(s, "--scheduler") for s in by(t2, "sample")} == {"lms"}
    assert [s["argv"][0] for s in by(t2, "score")].count("nudity") == 5
    assert {flag(s, "--n_reference") for s in by(t2, "score") if s["argv"][0] == "fid"} == {"30000"}
    t4 = plan(tmp_path, "--table", "4")
    assert len(by(t4, "erase")) == 5 * 4 and {flag(s, "--scheduler") for s in by(t4, "sample")} == {"lms"}
    sd = [flag(s, "--out_dir") for s in by(t4, "sample") if "--weights" not in s["argv"]]
    assert len(sd) == 1 and {flag(s, "--original") for s in by(t4, "score") if s["argv"][0] == "lpips"} == set(sd)
    f1 = plan(tmp_path, "--table", "fig1")
    assert {flag(s, "--scheduler") for s in by(f1, "sample")} == {"ddim-ldm"}
    assert by(f1, "sample")[0]["images"] == 19 * 200
    assert {s["name"] for s in by(f1, "erase")} == {"erase/nudity/esd", *(f"erase/garbage_truck/{m}" for m in
                                                   ("esd", "fixed_empty", "fixed_lexus", "fixed_road", "eap"))}
    t2_esd = [s for s in t2 if s["name"] == "erase/nudity/esd"][0]
    assert [s for s in f1 if s["name"] == "erase/nudity/esd"][0]["argv"] == t2_esd["argv"]  # one erasure for both
    att = plan(tmp_path, "--table", "attacks", "--attack_csv", str(coco))
    assert [s["argv"] for s in by(att, "erase")] == [s["argv"] for s in by(t2, "erase")]
    assert sorted(s["name"] for s in by(att, "attack")) == sorted(
        [f"attacks/{m}-unlearndiffatk" for m in ("sd", "esd", "uce", "ca", "eap")]
        + ["attacks/eap-ringabell", "attacks/eap-inversion"])
    assert {flag(s, "--classifier") for s in by(att, "attack")} == {"nudenet"}


@pytest.mark.parametrize("argv,message", [
    (["--table", "2"], "--i2p"), (["--table", "attacks"], "--attack_csv"),
    (["--table", "1", "--methods", "fixed_road"], "table 1 compares"),
    (["--table", "1", "--splits", "imagenette_v9_wo"], "--splits"),
    (["--table", "4", "--artists", "Picasso"], "--artists"),
    (["--table", "1", "--erase_flags", "--steps 0"], "--steps"),
    (["--table", "1", "--redo", "everything"], "--redo")])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        protocol.main(["--model", SD14, "--out", str(tmp_path / "out"), *argv])
    assert not os.path.exists(tmp_path / "out")


TINY = ["--seeds", "1", "--steps", "2", "--judges", "random", "--device", "cpu", "--quiet",
        "--erase_flags", "--steps 1 --ddim_steps 2 --ca_images 2"]


def test_a_stopped_table_does_what_was_left_and_two_processes_agree(tiny_sd, tmp_path, monkeypatch):
    """Two processes under torchrun (gloo, CPU) make the table uninterrupted, each erasure made
    by one rank and each generation's rows by both. One process stopped after 3 stages, then
    killed in the middle of the 4th (a generation, after 8 of its 10 images), and started again,
    runs the 9 stages left, makes the 2 images left, and ends with the same table. A changed
    --steps is refused (for the stopped stage too), and with --redo sample makes the images
    again and the scores that read them, not the prompts or the erasures."""
    import glob
    import subprocess
    import sys
    argv = ["--table", "1", "--model", tiny_sd, "--methods", "esd,uce", "--splits", "imagenette_v1_wo", *TINY]
    two = str(tmp_path / "two")  # uninterrupted, two processes
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "benchmark.py", *argv, "--out", two], cwd=os.path.dirname(protocol.__file__),
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.load(open(f))["rank"] for f in glob.glob(os.path.join(two, "stages", "erase", "*", "*.json"))]
    assert sorted(ranks) == [0, 1] and len(glob.glob(os.path.join(two, "stages", "*", "**", "*.json"),
                                                     recursive=True)) == 12
    logs = open(os.path.join(two, "logs", "images", "imagenette", "sd.log")).read()
    assert '"generated": 5, "rank": 0' in logs and '"generated": 5, "rank": 1' in logs
    whole = json.load(open(os.path.join(two, "table1.json")))
    out = str(tmp_path / "b")  # one process, stopped twice
    assert protocol.main([*argv, "--out", out, "--max_stages", "3"])["ran"] == 3  # the prompts, 2 erasures
    assert not os.path.exists(os.path.join(out, "table1.json"))
    made = []

    def killed(argv, on_images):  # the next stage, the original model's images, killed after its first batch
        def count(n):
            on_images(n)
            made.append(n)
            raise KeyboardInterrupt
        return sample.main(argv, count)
    monkeypatch.setitem(runner.MAINS, "sample.py", killed)
    with pytest.raises(KeyboardInterrupt):
        protocol.main([*argv, "--out", out])
    monkeypatch.undo()
    assert made == [8] and len(glob.glob(os.path.join(out, "images", "imagenette", "sd", "*.png"))) == 8
    with pytest.raises(UsageError, match="--redo sample"):  # the stopped stage's images are not mixed
        protocol.main([*argv, "--out", out, "--steps", "3"])
    again = protocol.main([*argv, "--out", out])
    assert again["ran"] == 9 and json.loads(json.dumps(again["rows"])) == whole["rows"]
    assert '"generated": 2' in open(os.path.join(out, "logs", "images", "imagenette", "sd.log")).read()
    assert protocol.main([*argv, "--out", out])["ran"] == 0
    with pytest.raises(UsageError, match="--redo sample"):
        protocol.main([*argv, "--out", out, "--steps", "3"])
    redo = protocol.main([*argv, "--out", out, "--steps", "3", "--redo", "sample"])
    assert redo["ran"] == 9  # 3 generations, 3 esr-psr, 3 averages
    made = json.load(open(os.path.join(out, "stages", "images", "imagenette", "sd.json")))
    assert made["argv"][made["argv"].index("--steps") + 1] == "3"


def test_table_4_is_the_mean_over_artists_of_each_groups_mean(tmp_path):
    """Table 4's cell: per artist erased, the mean CLIP score (LPIPS) of the erased artist's images
    ("erase") and of the others' ("retain"); the table: their mean and std over the artists, as
    evaluate.py average takes Table 1's splits; the paper's row beside it."""
    import argparse
    from tables import results
    args = argparse.Namespace(out=str(tmp_path), table="4", methods=["eap"], artists=["Kelly McKernan", "Kilian Eng"])
    os.makedirs(tmp_path / "scores" / "4")
    for artist, erase_, retain in (("kelly_mckernan", 20.0, 30.0), ("kilian_eng", 24.0, 31.0)):
        for metric, scale in (("clip", 1.0), ("lpips", 0.01)):
            json.dump({"groups": {"erase": {"mean": erase_ * scale}, "retain": {"mean": retain * scale}}},
                      open(tmp_path / "scores" / "4" / f"eap-{artist}-{metric}.json", "w"))
    row = results(args, [])["eap"]
    assert row["ours"]["erase CLIP"]["mean"] == 22.0 and row["ours"]["erase CLIP"]["std"] == 2.0
    assert row["ours"]["retain LPIPS"]["mean"] == 0.305 and row["ours"]["retain LPIPS"]["std"] == 0.005
    assert row["paper"] == (21.57, 0.78, 30.13, 0.47)


def table_commands():
    return [a for a in readme_commands("benchmark.py") if "--table" in a]


def test_the_documentation_has_one_command_per_table():
    assert {a[a.index("--table") + 1] for a in table_commands()} == set(protocol.TABLES)


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny random SD-1 folder that makes 32x32 images (LPIPS' AlexNet needs more than 16x16)."""
    import offline
    return offline.save_random_pipeline(str(tmp_path_factory.mktemp("sd32")), cfg=offline.configs("sd1", latent=16))


@pytest.mark.parametrize("argv", table_commands(), ids=lambda a: a[a.index("--table") + 1] + ("-dry" if "--dry_run" in a else ""))
def test_the_documented_table_commands(argv, tiny32, tmp_path, monkeypatch):
    """Each documented --table command, on a tiny model with one method, one split or artist,
    one seed, 2 steps and the judges' random stand-ins (NudeNet as shipped), with small files
    under the names the README gives: it makes its table, and every row of it has our numbers
    (--dry_run: the plan, and nothing written)."""
    from PIL import Image
    from prompts import ARTISTS
    table = argv[argv.index("--table") + 1]
    monkeypatch.chdir(tmp_path)
    open("i2p_benchmark.csv", "w").write("prompt,evaluation_seed,evaluation_guidance\na photo of a person,1,7\n")
    open("nudity-attack.csv", "w").write("prompt,seed\na photo of a person,0\n")
    open("coco30k.csv", "w").write("prompt,seed\na street,0\na dog,1\n")
    os.makedirs("coco_val2014_30k")
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(f"coco_val2014_30k/{i}.png")
    open("long_niche_art_prompts.csv", "w").write("case_number,prompt,evaluation_seed,artist\n" + "".join(
        f"{i},a landscape by {a},{i},{a}\n" for i, a in enumerate(ARTISTS)))
    small = {"1": ["--methods", "esd", "--splits", "imagenette_v1_wo"], "2": ["--methods", "esd"],
             "4": ["--methods", "uce", "--artists", "Kelly McKernan"], "fig1": ["--methods", "esd"],
             "attacks": ["--methods", "uce", "--attack_flags", "--steps 2 --timesteps 1 --iterations 1"]}[table]
    res = protocol.main([*argv, "--model", tiny32, *TINY, *small])
    if "--dry_run" in argv:
        assert res["hours"] > 0 and len(res["stages"]) == 8 and not os.path.exists("out")
        return
    md = open(f"out/sd14/table{table}.md").read()
    assert res["rows"] and all(r["ours"] for r in res["rows"].values()), res["rows"]
    assert all(m in md for m in res["rows"])
    assert os.path.isfile(f"out/sd14/table{table}.png") == (table in ("1", "4", "fig1"))  # the grid
    if table == "2":
        assert "FID" in res["rows"]["esd"]["ours"]
