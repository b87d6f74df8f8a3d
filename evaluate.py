"""Evaluation of Section 5 (Table 1 objects, Table 2 + Fig. 5 nudity, Table 4 artists) and of the
sensitivity analysis of Section 3.2 (Figs. 1-2), on folders of generated images.

A generated folder is what `python sample.py --csv P.csv --out_dir DIR` writes: DIR/prompts.csv
(P.csv's rows) and DIR/{row:05d}.png, one image per data row. Rows of two folders are matched on
(prompt, seed, sample).

    python evaluate.py prompts imagenette --out prompts/imagenette.csv     # 10 classes x 500 seeds
    python evaluate.py prompts artists --out prompts/artists.csv           # or --file yours.csv
    python evaluate.py prompts i2p --file i2p_benchmark.csv --out prompts/i2p.csv
    python evaluate.py prompts concepts --out prompts/concepts.csv --seeds 200
    python evaluate.py esr-psr out/imagenette/eap --erased "garbage truck, church, ..."  # Table 1
    python evaluate.py nudity out/i2p/eap                       # NER@t, Table 2; body parts, Fig. 5
    python evaluate.py clip out/artists/eap --erased "Kelly McKernan"                   # Table 4
    python evaluate.py lpips out/artists/eap --original out/artists/sd --erased "Kelly McKernan"
    python evaluate.py fid out/coco/eap --reference coco_val2014/                       # Table 2 FID
    python evaluate.py sensitivity --original out/concepts/sd --sanitized out/concepts/eap  # Figs 1-2
    python evaluate.py prompts toy --out prompts/toy.csv                   # toy.py's 36 concepts x 8
    python evaluate.py esr-psr out/toy-eap/images --erased "red circle" --classifier toy  # toy Table 1

The networks and the metrics' formulas live in metrics.py (ResNet-50, NudeNet, CLIP, LPIPS,
clean-fid); here: the prompt sets, the folders, the tables beside the paper's numbers. FID is
computed on exactly the images of prompts.csv's rows (a plain reference folder: the images
directly in it).
The paper does not say how its FID was computed (only "COCO 30K prompts vs COCO 30K validation
images"), so FID numbers are comparable only in trend. Each network can be replaced by a
random-weight one (`--classifier random`, `--clip_model random`, `--lpips_net random`,
`--features random`): that is how the tests run offline; those numbers mean nothing.
Results print as a table and are written as JSON with `--json PATH`.
"""
import argparse
import json
import os

import torch

from cli import UsageError, default_device, one_line_errors, read_csv, run_cli, write_csv
from metrics import (EXPOSED, THRESHOLDS, body_parts, clip_embeddings, clip_score, detect_nudity, esr_psr, fid,
                     load_classifier, load_clip, load_lpips, lpips_distances, ner, sensitivity, similarity,
                     topk_classes)
from prompts import (IMAGENETTE, IMAGENETTE_SPLITS, prompts_artists, prompts_concepts, prompts_i2p,
                     prompts_imagenette, prompts_toy, toy_classes)

# Published numbers: Table 1 (mean over 4 splits), Table 2, Table 4
PAPER_TABLE1 = {"SD": (22.0, 2.4, 78.0, 97.6), "ESD": (95.5, 88.9, 41.2, 56.1),
                "UCE": (100.0, 100.0, 23.4, 49.5), "CA": (98.4, 96.8, 44.2, 66.5),
                "EAP": (98.6, 96.1, 55.2, 79.9)}
PAPER_TABLE2 = {"SD": (16.69, 10.91, 5.46, 2.02), "CA": (13.84, 9.27, 4.74, 1.68),
                "UCE": (6.87, 3.42, 0.68, 0.21), "ESD-u": (5.32, 2.36, 0.74, 0.23),
                "EAP": (3.64, 1.70, 0.40, 0.06)}
PAPER_FID = {"EAP": (15.52,), "UCE": (15.98,), "ESD": (17.14,), "CA": (20.76,)}  # Table 2, COCO-30K
PAPER_TABLE4 = {"ESD": (23.56, 0.72, 29.63, 0.49), "CA": (27.79, 0.82, 29.85, 0.76),
                "UCE": (24.47, 0.74, 30.89, 0.40), "EAP": (21.57, 0.78, 30.13, 0.47)}
# ---------------------------------------------------------------- CSVs and generated folders

def read_folder(folder):
    """A folder written by `sample.py --csv`: its rows and the image path of each row."""
    if not os.path.isdir(folder):
        raise UsageError(f"folder {folder} does not exist")
    rows = read_csv(os.path.join(folder, "prompts.csv"), need=("prompt", "seed"))
    paths = [os.path.join(folder, f"{i:05d}.png") for i in range(len(rows))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"{len(missing)} of {len(rows)} images missing in {folder}, "
                         f"e.g. {os.path.basename(missing[0])}")
    return rows, paths


def pair_rows(rows, ref_rows):
    """For each row, the index of the row of `ref_rows` with the same (prompt, seed, sample)
    (`sample`: which of a published row's images, sample.py's z_T)."""
    key = lambda r: (r["prompt"], str(r["seed"]), r.get("sample") or "")  # noqa: E731
    index = {key(r): i for i, r in enumerate(ref_rows)}
    pairs = [index.get(key(r)) for r in rows]
    if None in pairs:
        r = rows[pairs.index(None)]
        raise UsageError(f"no image for prompt {r['prompt'][:40]!r} seed {r['seed']} in the other folder")
    return pairs


def names(text, known, what):
    """'a, b' -> [a, b], checked against `known` (case-insensitive)."""
    lower = {k.lower(): k for k in known}
    out = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in out if n.lower() not in lower]
    if unknown:
        raise UsageError(f"unknown {what} {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return [lower[n.lower()] for n in out]


def sensitivity_figures(delta, sims):
    """What Figs. 1-2 plot, {name: (kind, labels, values, title, xlabel)}: Fig. 1, delta per
    concept, largest first; Fig. 2, the histogram of the per-concept similarity over concepts."""
    bars = sorted(delta.items(), key=lambda kv: -kv[1])
    return {"bars": ("barh", [c for c, _ in bars], [d for _, d in bars],
                     "Fig. 1: delta(c), original - sanitized CLIP score", None),
            "hist": ("hist", [], list(sims.values()), "Fig. 2: similarity of the two models' outputs",
                     "CLIP image-image cosine, original vs sanitized (mean over seeds)")}


def fid_images(folder, expected=None, generated=False):
    """The images that FID (Table 2) scores in `folder`: a `sample.py --csv` folder's (required
    when `generated`) are exactly the rows of its prompts.csv (read_folder); any other folder's
    (COCO validation images) are the image files directly in it. Subfolders and sample.py's
    `*.tmp.png` temporaries are left out: clean-fid on its own globs a folder recursively and
    would score them too. Refuses fewer than 2 images, or other than `expected` when given."""
    if generated or os.path.isfile(os.path.join(folder, "prompts.csv")):
        paths = read_folder(folder)[1]
    elif not os.path.isdir(folder):
        raise UsageError(f"folder {folder} does not exist")
    else:
        from cleanfid.utils import EXTENSIONS
        paths = sorted(p for f in os.listdir(folder) if os.path.isfile(p := os.path.join(folder, f))
                       and os.path.splitext(f)[1][1:] in EXTENSIONS and not f.endswith(".tmp.png"))
    if expected is not None and len(paths) != expected:
        raise UsageError(f"{folder} has {len(paths)} images, --n_reference says {expected}")
    if len(paths) < 2:  # the covariance of one feature vector is undefined
        raise UsageError(f"FID needs at least 2 images; {folder} has {len(paths)}")
    return paths






# ---------------------------------------------------------------- output

def table(header, rows):
    cells = [list(map(str, header))] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)


def beside_paper(res, keys, paper):
    """Our numbers in the first column, each published method's in the next ones."""
    return table(["", "ours"] + [f"{m} (paper)" for m in paper],
                 [[k, res[k]] + [v[j] for v in paper.values()] for j, k in enumerate(keys)])


def mean_std(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    return dict(mean=round(x.mean().item(), 4), std=round(x.std(unbiased=False).item(), 4), n=len(x))


def groups(rows, erased):
    """Row indices per group: each artist, and "erase" / "retain" when artists are erased."""
    out = {"all": list(range(len(rows)))}
    if erased and "artist" not in rows[0]:
        raise UsageError("--erased needs an 'artist' column in prompts.csv (use prompts artists)")
    if "artist" not in rows[0]:
        return out
    erased = names(", ".join(erased), {r["artist"] for r in rows}, "artist")
    if erased:
        out["erase"] = [i for i, r in enumerate(rows) if r["artist"] in erased]
        out["retain"] = [i for i, r in enumerate(rows) if r["artist"] not in erased]
    for i, r in enumerate(rows):
        out.setdefault(r["artist"], []).append(i)
    return out


def plot(path, kind, labels, values, title, xlabel=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, max(3, 0.25 * len(labels)) if kind == "barh" else 4))
    if kind == "barh":
        ax.barh(labels, values)
        ax.invert_yaxis()
    else:
        ax.hist(values, bins=min(30, max(5, len(values) // 2)))
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    sub = p.add_subparsers(dest="cmd", required=True)
    q = one_line_errors(sub.add_parser("prompts", help="write a prompt CSV for sample.py --csv"))
    q.add_argument("set", choices=["imagenette", "artists", "i2p", "concepts", "toy"])
    q.add_argument("--out", required=True)
    q.add_argument("--file", help="artists: CSV with prompt,artist, or the published one (with evaluation_seed); "
                   "i2p: the I2P CSV; concepts: Fig. 1's published CSVs, comma-separated")
    q.add_argument("--seeds", type=int, help="seeds per prompt (imagenette 500, artists 5, concepts 200, "
                   "toy 8)")
    q.add_argument("--guidance", type=float, help="i2p: one guidance for all rows")
    q.add_argument("--concepts", help="concepts: comma-separated list (default: the paper's)")
    q.add_argument("--words", type=int, default=0, help="concepts: add the N most frequent English words")

    def metric(name, help, erased_help=None, folder=True):
        s = one_line_errors(sub.add_parser(name, help=help))
        if folder:
            s.add_argument("folder", help="a folder written by sample.py --csv")
        s.add_argument("--json", help="write the results here")
        s.add_argument("--device", default=default_device())
        s.add_argument("--batch", type=int, default=32)
        if erased_help:
            s.add_argument("--erased", default="", help=erased_help)
        return s
    s = metric("esr-psr", "Table 1: ESR-k / PSR-k with ResNet-50",
               "comma-separated erased classes, or a published split: " + ", ".join(IMAGENETTE_SPLITS))
    s.add_argument("--classifier", default="resnet50", choices=["resnet50", "random", "toy"],
                   help="toy: the toy world's oracle, for folders of `prompts toy`")
    s = metric("nudity", "Table 2 / Fig. 5: NER@t with NudeNet")
    s.add_argument("--plot", help="prefix of the body-part chart (default: beside --json)")
    s = metric("clip", "Table 4: CLIP score of image vs prompt", "comma-separated erased artists")
    s.add_argument("--clip_model", default="openai/clip-vit-base-patch32", help="or 'random'")
    s.add_argument("--clip_resize", default="published", choices=["published", "processor"],
                   help="published: torchvision's antialiased resize first (EAP's evaluation)")
    s = metric("lpips", "Table 4: LPIPS against the original model's images", "erased artists")
    s.add_argument("--original", required=True, help="the original model's folder (same rows)")
    s.add_argument("--lpips_net", default="alex", choices=["alex", "random"])
    s = metric("fid", "FID between two folders of images (clean-fid)")
    s.add_argument("--reference", required=True, help="folder of reference images")
    s.add_argument("--features", default="inception", choices=["inception", "random"])
    s.add_argument("--n_reference", type=int, help="refuse unless the reference has this many images "
                   "(30000 for COCO-30K)")
    s = metric("average", "Table 1's mean over splits: several esr-psr results as mean and std", folder=False)
    s.add_argument("results", nargs="+", help="esr-psr --json files, one a split")
    s = metric("sensitivity", "Section 3.2, Figs. 1-2: delta_{c_e}(c) and the similarity of the two "
               "models' images per concept", folder=False)
    s.add_argument("--original", required=True, help="folder of the original model theta")
    s.add_argument("--sanitized", required=True, help="folder of the sanitized model theta'")
    # the paper names "openai/clip-vit-base-patch14", which does not exist; EAP's eval_similarity_clip.py
    # scores Fig. 1 with torchmetrics' CLIPScore on ViT-L/14, after its antialiased resize to 224
    s.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="or 'random'")
    s.add_argument("--clip_resize", default="published", choices=["published", "processor"],
                   help="published: torchvision's antialiased resize first (EAP's evaluation)")
    s.add_argument("--plot", help="prefix of the two charts (default: beside --json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cmd == "prompts":
        if args.seeds is not None and args.seeds < 1:
            raise UsageError("--seeds must be at least 1")
        # seeds a prompt; for a published-format --file, images a row (Fig. 1's files: 1, as published)
        per = {"imagenette": 500, "artists": 5, "concepts": 1 if args.file else 200, "toy": 8}
        seeds = args.seeds or per.get(args.set)
        rows = {"imagenette": lambda: prompts_imagenette(seeds),
                "artists": lambda: prompts_artists(args.file, seeds),
                "i2p": lambda: prompts_i2p(args.file, args.guidance),
                "concepts": lambda: prompts_concepts(args.concepts, args.words, seeds, args.file),
                "toy": lambda: prompts_toy(seeds)}[args.set]()
        write_csv(args.out, rows)
        print(json.dumps({"wrote": args.out, "set": args.set, "rows": len(rows)}))
        return rows
    res = dict(command=args.cmd, config=vars(args))
    # charts: --plot, else beside --json, else in the working directory
    stem = getattr(args, "plot", None) or (os.path.splitext(args.json)[0] if args.json else args.cmd)
    if args.cmd == "esr-psr":
        rows, paths = read_folder(args.folder)
        if "class" not in rows[0]:
            raise UsageError(f"{args.folder} has no 'class' column (use prompts imagenette)")
        classes = toy_classes() if args.classifier == "toy" else IMAGENETTE  # name -> index
        split = {k.lower(): v for k, v in IMAGENETTE_SPLITS.items()}.get(args.erased.strip().lower())
        erased = names(", ".join(split) if split and args.classifier != "toy" else args.erased, classes, "class")
        if not erased:
            raise UsageError("--erased: name the erased classes (the same split for the original model)")
        cls = [names(r["class"], classes, "class")[0] for r in rows]
        labels = torch.tensor([classes[c] for c in cls])
        is_erased = torch.tensor([c in erased for c in cls])
        topk = topk_classes(*load_classifier(args.classifier, args.device), paths, 5, args.batch, args.device)
        res.update(esr_psr(topk, labels, is_erased), erased=erased, n_images=len(rows))
        res["per_class"] = {c: esr_psr(topk[m], labels[m], is_erased[m]) for c in classes
                            if (m := torch.tensor([x == c for x in cls])).any()}
        keys = ["ESR-1", "ESR-5", "PSR-1", "PSR-5"]
        print(beside_paper(res, keys, {} if args.classifier == "toy" else PAPER_TABLE1))
        print(table(["class", "erased"] + keys, [[c, c in erased] + [v[k] for k in keys]
                                                 for c, v in res["per_class"].items()]))
    elif args.cmd == "average":  # Table 1: "mean of 4 splits"
        runs = [json.load(open(f)) for f in args.results]
        keys = ["ESR-1", "ESR-5", "PSR-1", "PSR-5"]
        if any(r.get("command") != "esr-psr" for r in runs):
            raise UsageError("average takes the --json files of esr-psr runs")
        res.update({k: mean_std([r[k] for r in runs]) for k in keys}, splits=[r["erased"] for r in runs])
        print(beside_paper({k: f"{res[k]['mean']:.1f} ± {res[k]['std']:.1f}" for k in keys}, keys, PAPER_TABLE1))
    elif args.cmd == "nudity":
        rows, paths = read_folder(args.folder)
        detections = detect_nudity(paths)
        res.update(ner(detections), n_images=len(rows), parts_at_0_5=body_parts(detections, 0.5))
        res["plot"] = plot(f"{stem}_parts.png", "barh", [p.replace("_EXPOSED", "").lower() for p in EXPOSED],
                           list(res["parts_at_0_5"].values()), "detections above t = 0.5")
        res["detections"] = detections
        print(beside_paper(res, [f"NER-{t}" for t in THRESHOLDS], PAPER_TABLE2))
        print(table(["body part (t = 0.5)", "detections"], res["parts_at_0_5"].items()))
    elif args.cmd in ("clip", "lpips"):
        rows, paths = read_folder(args.folder)
        if args.cmd == "clip":
            texts = [r["prompt"] for r in rows]
            scores = clip_score(*clip_embeddings(load_clip(args.clip_model, args.device), paths, texts,
                                                 args.batch, args.device, args.clip_resize))
        else:
            ref_rows, ref_paths = read_folder(args.original)
            ref_paths = [ref_paths[j] for j in pair_rows(rows, ref_rows)]
            scores = lpips_distances(load_lpips(args.lpips_net, args.device), paths, ref_paths,
                                     args.batch, args.device)
        erased = [n.strip() for n in args.erased.split(",") if n.strip()]
        res["groups"] = {g: mean_std(scores[idx]) for g, idx in groups(rows, erased).items()}
        res["scores"] = [round(s, 4) for s in scores.tolist()]
        col = {"clip": (0, 2), "lpips": (1, 3)}[args.cmd]
        print(table(["group", f"{args.cmd} mean", "std", "n"],
                    [[g, v["mean"], v["std"], v["n"]] for g, v in res["groups"].items()]))
        print(table(["paper (Table 4)", "to erase", "to retain"],
                    [[m, v[col[0]], v[col[1]]] for m, v in PAPER_TABLE4.items()]))
    elif args.cmd == "fid":
        paths = fid_images(args.folder, generated=True)  # one image per row, no others
        ref_paths = fid_images(args.reference, args.n_reference)
        res["fid"] = fid(paths, ref_paths, args.features, args.batch, args.device)
        res.update(reference=args.reference, n_images=len(paths), n_reference=len(ref_paths))
        print(beside_paper(dict(FID=f"{res['fid']:.4g}"), ["FID"], PAPER_FID))
    elif args.cmd == "sensitivity":
        rows, paths = read_folder(args.original)
        rows_e, paths_e = read_folder(args.sanitized)
        paths_e = [paths_e[j] for j in pair_rows(rows, rows_e)]  # same concept and seed
        clip = load_clip(args.clip_model, args.device)
        texts = [r["prompt"] for r in rows]
        (e_orig, e_txt), (e_erased, _) = (clip_embeddings(clip, ps, texts, args.batch, args.device, args.clip_resize)
                                          for ps in (paths, paths_e))
        delta = sensitivity(rows, clip_score(e_orig, e_txt), clip_score(e_erased, e_txt))
        sims = similarity(rows, e_orig, e_erased)
        res["delta"] = dict(sorted(delta.items(), key=lambda kv: -kv[1]))
        res["similarity"] = dict(sorted(sims.items(), key=lambda kv: kv[1]))  # most changed first
        res["k"] = len(rows) // len(delta)
        res["plots"] = [plot(f"{stem}_{name}.png", *fig[:4], xlabel=fig[4])
                        for name, fig in sensitivity_figures(delta, sims).items()]
        print(table(["concept", "delta", "similarity"],
                    [[c, round(d, 3), round(sims[c], 4)] for c, d in res["delta"].items()]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    run_cli(main)
