"""The paper's tables on a diffusion model, one command each (benchmark.py --table), as the
published protocol makes them (docs/evaluation.md): erase each method's concepts -> generate the
table's prompts -> score them -> tableN.md and tableN.json with the paper's numbers beside ours.
Every stage is one call of erase.py, sample.py, evaluate.py or attack.py with the flags that
--dry_run prints as commands, with the GPU-hours the plan will take.

    python benchmark.py --table 1 --model CompVis/stable-diffusion-v1-4 --out out/sd14 --dry_run
    python benchmark.py --table 1 --model CompVis/stable-diffusion-v1-4 --out out/sd14
    torchrun --nproc_per_node 8 benchmark.py --table 1 --model CompVis/stable-diffusion-v1-4 --out out/sd14

Tables share --out: the original model's images and an erasure that two tables ask for with the
same flags (Table 2's and the attack table's nudity models) are made once. Started again, it
redoes no finished stage (OUT/stages/NAME.json records each stage's command); a stage recorded
with another command is refused, or made again with --redo KIND; a stopped erasure
goes on from its checkpoint (erase.py --save_every / --resume), a stopped generation from its
last image (sample.py). Under torchrun or accelerate launch the erasures and attacks are shared
out over the ranks, each generation is sharded by rows (sample.py), and rank 0 scores.
"""
import json
import os
import shlex

import erase
import evaluate
from cli import UsageError
from prompts import (ARTISTS, DATA, IMAGENETTE_SPLITS, prompts_artists, prompts_concepts, prompts_i2p,
                     prompts_imagenette)
from runner import done, execute, ranks, todo
from tables import markdown, results, slug, table_picture

TABLES = ("1", "2", "4", "fig1", "attacks")
KINDS = ("prompts", "erase", "sample", "score", "attack")  # a stage runs one of these
# the published evaluation flags shared by every method of a table (docs/evaluation.md)
PUBLISHED = ["--negative_guidance", "1", "--timestep", "published"]
EAP = [*PUBLISHED, "--loss_space", "x0", "--eta", "1e-2", "--n_iter", "1", "--select", "kmeans-sklearn",
       "--keep_erased", "--pi_grad", "trained"]
# CA's anchor per Imagenette class: the paper does not give them; ours, the first five as in docs/
CA_ANCHOR = {"cassette player": "music player", "church": "building", "garbage truck": "truck",
             "parachute": "sky", "french horn": "brass instrument", "chain saw": "saw", "gas pump": "pump",
             "tench": "fish", "english springer": "dog", "golf ball": "ball"}
# each table's erasures: method -> erase.py flags for its concept(s) C
ERASURES = {
    "1": dict(esd=lambda C: ["--method", "esd", *PUBLISHED],
              uce=lambda C: ["--method", "uce", "--uce_technique", "tensor", "--uce_templates", "object",
                             "--preserve_scale", "1"],
              ca=lambda C: ["--method", "ca", "--anchor", ", ".join(CA_ANCHOR[c.lower()] for c in C)],
              eap=lambda C: EAP,
              age=lambda C: ["--method", "age", *EAP, "--vocab", "imagenet", "--K", "100", "--tau", "0.1",
                             "--gumbel_topk", "2", "--k_closest", "100"]),
    "2": dict(esd=lambda C: ["--method", "esd", "--train_method", "noxattn", *PUBLISHED],
              uce=lambda C: ["--method", "uce", "--uce_technique", "tensor", "--preserve_scale", "1"],
              ca=lambda C: ["--method", "ca", "--anchor", "a person wearing clothes"],
              eap=lambda C: ["--train_method", "noxattn", "--K", "50", *EAP, "--k_closest", "200"]),
    "4": dict(esd=lambda C: ["--method", "esd", *PUBLISHED],
              uce=lambda C: ["--method", "uce", "--uce_technique", "tensor", "--uce_templates", "art",
                             "--preserve_scale", "1"],
              ca=lambda C: ["--method", "ca", "--anchor", "painting"],
              eap=lambda C: EAP),
    # Fig. 1a: "nudity" (ESD-u) and "garbage truck" (ESD); Fig. 1b: "garbage truck" preserving a fixed
    # concept ("", "lexus", "road") or, with EAP, the most sensitive one
    "fig1": dict(esd=lambda C: ["--method", "esd", *PUBLISHED],
                 fixed_empty=lambda C: ["--method", "fixed", "--preserve", "", *PUBLISHED],
                 fixed_lexus=lambda C: ["--method", "fixed", "--preserve", "lexus", *PUBLISHED],
                 fixed_road=lambda C: ["--method", "fixed", "--preserve", "road", *PUBLISHED],
                 eap=lambda C: EAP),
}
ERASURES["attacks"] = {m: ERASURES["2"][m] for m in ("esd", "uce", "ca", "eap")}
# counted, not measured (docs/speed.md): 3 s per 512 px image at 100 guided steps (200 UNet
# forwards) in fp32 on an H100, so 15 ms a forward; forwards per update as bench.py counts them at
# 50 DDIM steps (mean t_enc 25) with the backward as two forwards of the trained batch
SECONDS_PER_FORWARD = 3.0 / 200
FORWARDS_PER_UPDATE = dict(esd=2 * 25 + 3 + 2, fixed=2 * 25 + 4 + 4, eap=4 * 25 + 8 + 6, age=4 * 25 + 8 + 6,
                           ca=3 + 2, uce=0)
# attack.py, per prompt: UnlearnDiffAtk 40 Adam steps x 50 timesteps (forward and backward, 3
# forwards each) and its images; Ring-A-Bell and the inversion: about one image and 1000 x 4 steps
ATTACK_FORWARDS = dict(unlearndiffatk=40 * 50 * 3 + 200, ringabell=300, inversion=12000 + 200)


class Plan:
    """The stages of one table in the order of their inputs, each a dict: kind (KINDS), name (its
    record's and log's), script and argv, the images it makes, its counted seconds."""

    def __init__(self, args):
        self.args, self.stages = args, []

    def add(self, kind, name, script, argv, images=0, seconds=0.0):
        for s in self.stages:  # a stage two tables share (an erasure, the original images) is one stage
            if s["name"] == name:
                return s
        s = dict(kind=kind, name=name, script=script, argv=[str(a) for a in argv], images=images, seconds=seconds)
        self.stages.append(s)
        return s

    def path(self, *parts):
        return os.path.join(self.args.out, *parts)

    def prompts(self, name, argv):
        """evaluate.py prompts: the table's prompt CSV (rows counted without writing it)."""
        out = self.path("prompts", f"{name}.csv")
        self.add("prompts", f"prompts/{name}", "evaluate.py", ["prompts", *argv, "--out", out])
        return out

    def erase(self, table, method, concepts, tag=None):
        """One erasure with the table's flags (in OUT/erase/TAG/METHOD); its weights."""
        tag = tag or slug(", ".join(concepts))
        a, folder = self.args, self.path("erase", tag, method)
        argv = ["--model", a.model, "--concept", ", ".join(concepts), *ERASURES[table][method](concepts),
                *a.device_flag, "--out", folder, *shlex.split(a.erase_flags)]
        e = erase.parse_args(argv)  # a typo in --erase_flags is refused before any work
        kind = "fixed" if method.startswith("fixed") else method
        forwards = e.steps * FORWARDS_PER_UPDATE[kind] + (e.ca_images * 100 * len(concepts) if kind == "ca" else 0)
        self.add("erase", f"erase/{tag}/{method}", "erase.py", argv,
                 seconds=max(forwards * SECONDS_PER_FORWARD, 60) * self.args.forward_scale)
        return os.path.join(folder, "weights.safetensors")

    def generate(self, csv, rows, name, model, scheduler, weights=None):
        """sample.py --csv: one image a row of csv, in OUT/images/NAME/MODEL."""
        a, out = self.args, self.path("images", name, model)
        argv = ["--csv", csv, "--out_dir", out, "--model", a.model, "--steps", a.steps, "--scheduler", scheduler,
                *(["--weights", weights] if weights else []), *a.device_flag]
        self.add("sample", f"images/{name}/{model}", "sample.py", argv, images=rows,
                 seconds=rows * a.steps * 2 * SECONDS_PER_FORWARD * a.forward_scale)
        return out

    def score(self, table, name, argv):
        out = self.path("scores", table, f"{name}.json")
        self.add("score", f"scores/{table}/{name}", "evaluate.py", [*argv, "--json", out, *self.args.device_flag])
        return out

    def attack(self, name, argv, prompts, kind):
        out = self.path("attacks", f"{name}.json")
        self.add("attack", f"attacks/{name}", "attack.py", [*argv, "--json", out, *self.args.device_flag,
                                                            *shlex.split(self.args.attack_flags)],
                 seconds=prompts * ATTACK_FORWARDS[kind] * SECONDS_PER_FORWARD * self.args.forward_scale)
        return out


def judge(args, flag):
    """The published judge, or its random-weight stand-in (--judges random: offline tests)."""
    random = args.judges == "random"
    return {"classifier": ["--classifier", "random" if random else "resnet50"],
            "clip": ["--clip_model", "random"] if random else [],
            "lpips": ["--lpips_net", "random"] if random else [],
            "fid": ["--features", "random"] if random else ["--n_reference", "30000"]}[flag]


def count_rows(args, table):
    """Rows of the table's prompt set, as evaluate.py prompts will write them."""
    seeds = args.seeds
    return {"1": lambda: len(prompts_imagenette(seeds or 500)),
            "2": lambda: len(prompts_i2p(args.i2p, 7.5)),
            "4": lambda: len(prompts_artists(args.artists_file, seeds or 5)),
            "fig1": lambda: len(fig1_rows(args))}[table]()


def fig1_concepts():
    """Fig. 1's 20 published concepts (data/fig1_concepts.json); " " cannot be a --concepts item."""
    names = [c for cs in json.load(open(os.path.join(DATA, "fig1_concepts.json"))).values() for c in cs]
    return [c for c in names if c.strip()]


def fig1_rows(args):
    return prompts_concepts(None if args.fig1_files else ", ".join(fig1_concepts()), 0,
                                    args.seeds or (1 if args.fig1_files else 200), args.fig1_files)


def plan(args):
    """The stages of args.table with args.methods: what --dry_run prints and the run runs."""
    p, t = Plan(args), args.table
    methods = args.methods
    unknown = [m for m in methods if m not in ERASURES[t]]
    if unknown:
        raise UsageError(f"--methods: table {t} compares {', '.join(ERASURES[t])}; not {unknown[0]}")
    seeds = ["--seeds", str(args.seeds)] if args.seeds else []
    if t == "1":
        csv, rows = p.prompts("imagenette", ["imagenette", *seeds]), count_rows(args, t)
        sd = p.generate(csv, rows, "imagenette", "sd", "ddim-ldm")
        for split in args.splits:
            for model in ["sd", *methods]:
                C = [c.lower() for c in IMAGENETTE_SPLITS[split]]
                folder = sd if model == "sd" else p.generate(csv, rows, "imagenette", f"{split}-{model}", "ddim-ldm",
                                                             p.erase(t, model, C, split))
                p.score("1", f"{model}-{split}", ["esr-psr", folder, "--erased", split, *judge(args, "classifier")])
        for model in ["sd", *methods]:
            p.score("1", model, ["average", *[p.path("scores", "1", f"{model}-{s}.json") for s in args.splits]])
    elif t == "2":
        if not args.i2p:
            raise UsageError("--table 2 needs --i2p: the I2P benchmark CSV (prompt, evaluation_seed, ...)")
        if bool(args.coco) != bool(args.coco_reference):
            raise UsageError("FID needs both --coco (prompt,seed CSV) and --coco_reference (its image folder)")
        csv, rows = p.prompts("i2p", ["i2p", "--file", args.i2p, "--guidance", "7.5"]), count_rows(args, t)
        for model in ["sd", *methods]:
            w = None if model == "sd" else p.erase(t, model, ["nudity"])
            p.score("2", model, ["nudity", p.generate(csv, rows, "i2p", f"nudity-{model}", "lms", w)])
            if args.coco and w:
                images = p.generate(args.coco, len(evaluate.read_csv(args.coco, need=("prompt", "seed"))), "coco",
                                    f"nudity-{model}", "lms", w)
                p.score("2", f"{model}-fid", ["fid", images, "--reference", args.coco_reference, *judge(args, "fid")])
    elif t == "4":
        csv, rows = p.prompts("artists", ["artists", *seeds, *(["--file", args.artists_file] if args.artists_file
                                                              else [])]), count_rows(args, t)
        sd = p.generate(csv, rows, "artists", "sd", "lms")
        for artist in args.artists:
            for model in methods:
                f = p.generate(csv, rows, "artists", f"{slug(artist)}-{model}", "lms", p.erase(t, model, [artist]))
                p.score("4", f"{model}-{slug(artist)}-clip", ["clip", f, "--erased", artist, *judge(args, "clip")])
                p.score("4", f"{model}-{slug(artist)}-lpips", ["lpips", f, "--original", sd, "--erased", artist,
                                                               *judge(args, "lpips")])
    elif t == "fig1":
        files = ["--file", args.fig1_files] if args.fig1_files else ["--concepts", ", ".join(fig1_concepts())]
        csv, rows = p.prompts("fig1", ["concepts", *files, *seeds]), count_rows(args, t)
        sd = p.generate(csv, rows, "fig1", "sd", "ddim-ldm")
        erased = [("nudity", "esd")] + [("garbage truck", m) for m in methods]
        for concept, model in erased:
            if model not in methods:
                continue
            flags_of = "2" if concept == "nudity" else t  # ESD-u on "nudity": Table 2's erasure
            w = p.erase(flags_of, model, [concept])
            f = p.generate(csv, rows, "fig1", f"{slug(concept)}-{model}", "ddim-ldm", w)
            p.score("fig1", f"{slug(concept)}-{model}", ["sensitivity", "--original", sd, "--sanitized", f,
                                                          *judge(args, "clip")])
    else:  # the attack table: UnlearnDiffAtk on Table 2's nudity models; Ring-A-Bell and the inversion on EAP's
        if not args.attack_csv:
            raise UsageError("--table attacks needs --attack_csv: UnlearnDiffAtk's nudity prompts (prompt, seed)")
        n = len(evaluate.read_csv(args.attack_csv, need=("prompt",)))
        for model in ["sd", *methods]:
            w = [] if model == "sd" else ["--weights", p.erase("attacks", model, ["nudity"])]
            base = ["--model", args.model, *w, "--csv", args.attack_csv, "--concept", "nudity", "--classifier", "nudenet"]
            for kind in ["unlearndiffatk", *(["ringabell", "inversion"] if model == "eap" else [])]:
                p.attack(f"{model}-{kind}", [*base, "--attack", kind, *(["--eta", "3"] if kind == "ringabell" else [])],
                         n, kind)
    return p.stages


# ---------------------------------------------------------------------------- the command line
def parse_args(argv=None):
    """benchmark.py --table's flags (the toy world's are benchmark.py's own)."""
    import argparse
    from cli import one_line_errors
    g = one_line_errors(argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n")[0]))
    g.add_argument("--table", required=True, choices=TABLES, help="the published protocol's runs of this table")
    g.add_argument("--model", required=True, help="hub id or diffusers folder (any supported family)")
    g.add_argument("--out", required=True, help="every stage's output; tables run into one --out share stages")
    g.add_argument("--dry_run", action="store_true", help="print the plan (commands, images, GPU-hours) and stop")
    g.add_argument("--methods", help="comma-separated (default: every method the table compares)")
    g.add_argument("--splits", default=",".join(IMAGENETTE_SPLITS), help="Table 1's published splits")
    g.add_argument("--artists", default=",".join(ARTISTS), help="Table 4's artists, comma-separated")
    g.add_argument("--seeds", type=int, help="images a prompt (published: Table 1 500, Table 4 5, Fig. 1 200)")
    g.add_argument("--steps", type=int, default=100, help="sampler steps of every image (published: 100)")
    g.add_argument("--i2p", help="Table 2: the I2P benchmark CSV")
    g.add_argument("--coco", help="Table 2's FID: COCO-30K captions, a CSV with prompt,seed")
    g.add_argument("--coco_reference", help="Table 2's FID: the folder of COCO-30K validation images")
    g.add_argument("--artists_file", help="Table 4: EAP's long_niche_art_prompts.csv (or prompt,artist)")
    g.add_argument("--fig1_files", help="Fig. 1: EAP's similarity-nudity*_200.csv, comma-separated")
    g.add_argument("--attack_csv", help="the attack table: UnlearnDiffAtk's nudity prompts")
    g.add_argument("--judges", default="published", choices=["published", "random"],
                   help="random: the judges' random-weight stand-ins (offline tests; numbers mean nothing)")
    g.add_argument("--erase_flags", default="", help="appended to every erase.py command")
    g.add_argument("--attack_flags", default="", help="appended to every attack.py command")
    g.add_argument("--device", help="every script's --device (default: theirs, CUDA when there is one)")
    g.add_argument("--rates", help="bench.py --json's file: measured seconds instead of counted ones")
    g.add_argument("--redo", default="", help=f"{', '.join(KINDS)} (comma-separated): make such stages "
                   "recorded with another command again, and what reads them")
    g.add_argument("--max_stages", type=int, help="run at most this many stages now (the rest on the next start)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return check(g.parse_args(argv))


def check(args):
    """--table's flags, checked before anything runs."""
    args.methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(ERASURES[args.table])
    args.splits = [s.strip() for s in args.splits.split(",")]
    bad = [s for s in args.splits if s not in IMAGENETTE_SPLITS]
    if bad:
        raise UsageError(f"--splits: '{bad[0]}' is not one of {', '.join(IMAGENETTE_SPLITS)}")
    args.artists = [a.strip() for a in args.artists.split(",")]
    bad = [a for a in args.artists if a not in ARTISTS]
    if bad:
        raise UsageError(f"--artists: '{bad[0]}' is not one of {', '.join(ARTISTS)}")
    for flag in ("seeds", "steps", "max_stages"):
        if getattr(args, flag) is not None and getattr(args, flag) < (0 if flag == "max_stages" else 1):
            raise UsageError(f"--{flag} must be at least 1")
    args.redo = [r.strip() for r in args.redo.split(",") if r.strip()]
    if set(args.redo) - set(KINDS):
        raise UsageError(f"--redo takes {', '.join(KINDS)} (comma-separated)")
    args.device_flag = ["--device", args.device] if args.device else []
    args.forward_scale = 1.0
    if args.rates:  # bench.py's measured generation: seconds a forward, against the counted 15 ms
        g = json.load(open(args.rates))["generation"]
        args.forward_scale = 1 / g["images_per_second"] / (2 * g["steps"]) / SECONDS_PER_FORWARD
    return args


PROTOCOL = {  # what --dry_run says of each table's published protocol (docs/evaluation.md)
    "1": "'Image of {{class}}', 10 Imagenette classes x {seeds} seeds ({rows:,} images a model); CompVis DDIM "
         "(ddim-ldm, t_start -1), {steps} steps, guidance 7.5; judge ResNet-50 (torchvision IMAGENET1K_V2), "
         "ESR-1/5, PSR-1/5; splits {splits}, mean ± std over them",
    "2": "I2P, {rows:,} prompts, each with its evaluation_seed, guidance 7.5; LMS, {steps} steps; judge NudeNet, "
         "NER at 0.3/0.5/0.7/0.8, Fig. 5's body parts; FID (clean-fid) on COCO-30K where --coco is given",
    "4": "{rows:,} rows (artist x prompt x {seeds} samples); LMS, {steps} steps, guidance 7.5; judges CLIP "
         "ViT-B/32 score and LPIPS (AlexNet) against the original model's image; one model per artist: {artists}",
    "fig1": "each concept its own prompt, {rows:,} rows ({seeds} seeds a concept); CompVis DDIM (ddim-ldm), {steps} "
            "steps, guidance 7.5; delta = CLIP ViT-L/14 score of the original minus the sanitized model's",
    "attacks": "UnlearnDiffAtk (5 prefix tokens, 40 Adam steps x 50 timesteps) on Table 2's nudity models, "
               "judge NudeNet; Ring-A-Bell (eta 3) and the inversion on EAP's; ASR before and after",
}


def dry_run(args, stages):
    """The protocol, the plan as commands, its images and the GPU-hours it will take."""
    finished = sum(done(args, s) for s in stages)
    rows = count_rows(args, args.table) if args.table != "attacks" else 0
    seeds = args.seeds or dict(zip(("1", "4", "fig1"), (500, 5, 200))).get(args.table)
    print(f"table {args.table} on {args.model}: " + PROTOCOL[args.table].format(
        rows=rows, seeds=seeds, steps=args.steps, splits=", ".join(args.splits), artists=", ".join(args.artists))
        + ("; judges: random stand-ins" if args.judges == "random" else ""))
    print(f"{len(stages)} stages ({finished} done), {sum(s['images'] for s in stages):,} images")
    for s in stages:
        note = ([f"{s['images']:,} images"] if s["images"] else []) + \
            ([f"~{s['seconds'] / 3600:.2f} GPU-h"] if s["seconds"] else [])
        print(("done: " if done(args, s) else "") + f"python {s['script']} {shlex.join(s['argv'])}"
              + (f"   # {', '.join(note)}" if note else ""))
    hours = sum(s["seconds"] for s in stages if not done(args, s)) / 3600
    source = f"measured rates from {args.rates}" if args.rates else \
        "counted, not measured: 15 ms a UNet forward (--rates bench.json for measured ones)"
    print(f"left: ~{hours:.1f} GPU-hours ({source})")
    return hours


def main(argv=None):
    """benchmark.py --table: plan, run (or print) and tabulate."""
    args = parse_args(argv)
    stages = plan(args)
    if args.dry_run:
        return dict(stages=stages, hours=dry_run(args, stages))
    rank, world = ranks()
    ran = execute(args, stages, rank, world)
    if rank != 0 or (args.max_stages is not None and todo(args, stages)):
        return dict(stages=stages, ran=ran)
    rows = results(args, stages)
    table_picture(args, stages)
    table = markdown(args, rows)
    print(table)
    with open(os.path.join(args.out, f"table{args.table}.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, f"table{args.table}.json"), "w") as f:
        json.dump(dict(table=args.table, model=args.model, rows=rows,
                       stages=[dict(name=s["name"], command=f"python {s['script']} {shlex.join(s['argv'])}")
                               for s in stages]), f, indent=1)
    return dict(stages=stages, ran=ran, rows=rows)
