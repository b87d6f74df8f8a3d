"""The toy benchmark's numbers and pictures (benchmark.py runs it): Table 1's columns per run
(ESR-1, PSR-1, the accuracy drop on concepts that share a word with E and on those that share
none), mean ± std over runs, the verdict on EAP against ESD, the robustness table, the
original-vs-methods grid and Fig. 1a's sensitivity bars. And a paper's table on a diffusion
model (benchmark.py --table, protocol.py): its rows from the scores' JSON files, table.md with
the paper's rows, a grid of the images."""
import json
import os

import numpy as np
from PIL import Image, ImageDraw

import attack
import evaluate
from sample import GRID_PAD, grid
from toy import CONCEPTS, shares_word

# Table 1's columns, one number per run (split of E, seed, method); the table gives mean ± std
FIGURES = ("esr1", "psr1", "drop_shared", "drop_unshared", "erase_seconds")


def partition(E):
    """Indices into CONCEPTS: E, the 34 (or so) kept, those of them that share a word with E, and
    those that share none."""
    e_idx = [CONCEPTS.index(e) for e in E]
    keep = [i for i in range(36) if i not in e_idx]
    shared = [i for i in keep if shares_word(CONCEPTS[i], E)]
    return e_idx, keep, shared, [i for i in keep if i not in shared]


def figures(acc, acc0, E):
    """One run's row: ESR-1 (E's images not read as it), PSR-1 (the rest read as theirs), and
    the mean drop delta(c) = acc0(c) - acc(c) over the concepts that share a word with E / none."""
    e_idx, keep, shared, unshared = partition(E)
    drop = acc0 - acc  # delta(c), in percentage points
    return dict(esr1=round(100 - float(acc[e_idx].mean()), 2), psr1=round(float(acc[keep].mean()), 2),
                drop_shared=round(float(drop[shared].mean()), 2), drop_unshared=round(float(drop[unshared].mean()), 2))


def mean_std(values):
    """The mean and the sample standard deviation (n - 1 in the denominator; 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return dict(mean=round(float(v.mean()), 2), std=round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 2),
                values=[float(x) for x in values])


def aggregate(runs):
    """methods.<name>: for each figure, mean ± std over that method's runs (every split and seed)."""
    names = list(dict.fromkeys(r["method"] for r in runs))
    return {name: dict(runs=sum(r["method"] == name for r in runs),
                       **{f: mean_std([r[f] for r in runs if r["method"] == name]) for f in FIGURES})
            for name in names}


def verdict(runs, agg):
    """Does EAP keep more of the other concepts than ESD (PSR-1) by more than the spread? Yes when
    the gap of the means exceeds the larger of the two stds; the paired differences over the same
    (split, seed) are given beside it. None when eap or esd was not run."""
    if not {"eap", "esd"} <= set(agg):
        return None
    a, b = agg["eap"]["psr1"], agg["esd"]["psr1"]
    gap, spread = a["mean"] - b["mean"], max(a["std"], b["std"])
    esd = {(r["split"], r["seed"]): r["psr1"] for r in runs if r["method"] == "esd"}
    d = [round(r["psr1"] - esd[r["split"], r["seed"]], 2) for r in runs
         if r["method"] == "eap" and (r["split"], r["seed"]) in esd]  # eap - esd, same split and seed
    paired, higher = mean_std(d), sum(x > 0 for x in d)
    beats = gap > spread
    text = (f"EAP's PSR-1 {'beats' if beats else 'does not beat'} ESD's by more than the spread: "
            f"{a['mean']:.1f} ± {a['std']:.1f} vs {b['mean']:.1f} ± {b['std']:.1f}, a gap of {gap:+.1f} points "
            f"{'>' if beats else '<='} {spread:.1f} (the larger std); paired over {len(d)} (split, seed) runs "
            f"{paired['mean']:+.1f} ± {paired['std']:.1f}, EAP higher in {higher} of {len(d)} "
            f"(ESR-1: EAP {agg['eap']['esr1']['mean']:.1f}, ESD {agg['esd']['esr1']['mean']:.1f})")
    return dict(eap_beats_esd_beyond_spread=beats, psr1_gap=round(gap, 2), spread=round(spread, 2),
                paired_difference=paired, eap_higher_in=higher, pairs=len(d), text=text)


def add_robustness(results, runs, original):
    """methods.<name>.asr_pre and .asr_post.<attack> (mean ± std over the runs), the original
    model's, and the sanity check: every attack breaks the original model (ASR >= 80%) and the
    plain prompts rarely break esd (ASR <= 20%)."""
    for name, agg in results["methods"].items():
        mine = [r for r in runs if r["method"] == name]
        agg["asr_pre"] = mean_std([r["asr_pre"] for r in mine])
        agg["asr_post"] = {a: mean_std([r["asr_post"][a] for r in mine]) for a in attack.ATTACKS}
    results["original"]["asr_pre"] = mean_std([o["asr_pre"] for o in original])
    results["original"]["asr_post"] = {a: mean_std([o["asr_post"][a] for o in original]) for a in attack.ATTACKS}
    high = {a: v["mean"] >= 80 for a, v in results["original"]["asr_post"].items()}
    esd = results["methods"].get("esd", {}).get("asr_pre", {}).get("mean")
    results["sanity"] = dict(original_asr_post_at_least_80=high, esd_asr_pre_at_most_20=None if esd is None else esd <= 20,
                             passed=all(high.values()) and (esd is None or esd <= 20))


def robustness_table(r):
    """The toy world's robustness: ASR before and after each attack, mean ± std over the runs."""
    def ms(v):
        return f"{v['mean']:.1f} ± {v['std']:.1f}"
    rows = ["| model | ASR pre | " + " | ".join(f"ASR post, {a}" for a in attack.ATTACKS) + " |",
            "|---" * (2 + len(attack.ATTACKS)) + "|"]
    for name, v in [("original", r["original"]), *r["methods"].items()]:
        rows.append(f"| {name} | {ms(v['asr_pre'])} | " + " | ".join(ms(v["asr_post"][a]) for a in attack.ATTACKS) + " |")
    s = r["sanity"]
    return ("\n" + "\n".join(rows) + f"\n\nsanity check {'passed' if s['passed'] else 'FAILED'}: every attack breaks "
            f"the original model ({s['original_asr_post_at_least_80']}), the plain prompts rarely break esd "
            f"({s['esd_asr_pre_at_most_20']})\n")


def markdown_table(r):
    """Table 1 of the toy world: mean ± std over the runs of each method, then the verdict."""
    def ms(v):
        return f"{v['mean']:.1f} ± {v['std']:.1f}"
    o = r["original"]
    rows = ["| method | runs | ESR-1 | PSR-1 | accuracy drop, shares a word | accuracy drop, shares none | erase time |",
            "|---|---|---|---|---|---|---|",
            f"| original | {o['splits']} | {ms(o['esr1'])} | {ms(o['psr1'])} | - | - | - |"]
    for name, v in r["methods"].items():
        rows.append(f"| {name} | {v['runs']} | {ms(v['esr1'])} | {ms(v['psr1'])} | {ms(v['drop_shared'])} | "
                    f"{ms(v['drop_unshared'])} | {v['erase_seconds']['mean']:.0f} s |")
    head = (f"E: {'; '.join(', '.join(s['E']) for s in r['splits'])} ({len(r['splits'])} splits) x seeds "
            f"{', '.join(map(str, r['seeds']))}; mean ± std over the runs (n - 1); rates and drops in %, "
            f"total {r['seconds']} s")
    tail = f"\n{r['verdict']['text']}\n" if r["verdict"] else ""
    tail += robustness_table(r) if "sanity" in r else ""
    return f"{head}\n\n" + "\n".join(rows) + "\n" + tail


def picture(images, E, shared, unshared, cols, path):
    """Methods as rows (the original model first); as columns the erased concepts, two that share
    a word with one of them and two that share none, the first two of `cols` (seeds) each, each
    concept named above its pair and each group above its concepts: about 900 pixels wide."""
    groups = [("erased", [CONCEPTS.index(e) for e in E]), ("shares a word", shared[:2]), ("shares none", unshared[:2])]
    concepts, seeds = [i for _, g in groups for i in g], cols[:2]
    n = len(images["original"]) // 36
    body = grid([[imgs[i * n + s] for i in concepts for s in seeds] for imgs in images.values()], list(images))
    w = (body.width - GRID_PAD) // len(concepts)  # one concept's pair of images
    out = Image.new("RGB", (body.width, body.height + 34), "white")
    draw, x = ImageDraw.Draw(out), GRID_PAD
    for name, g in groups:
        draw.text((x + 4, 4), name, fill="black")
        draw.line([(x + 2, 16), (x + w * len(g) - 4, 16)], fill="gray")
        for i in g:
            draw.text((x + 4, 20), CONCEPTS[i], fill="black")
            x += w
    out.paste(body, (0, 34))
    out.save(path)


def spectrum(r, acc0, shared, unshared, path, title=None):
    """Fig. 1a / Fig. 2 of the toy world: delta(c) for every remaining concept, per method, the
    concepts in one order (largest mean drop over the methods first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(r["methods"])
    drop = {n: acc0 - np.array([r["methods"][n]["per_concept"][c] for c in CONCEPTS]) for n in names}
    order = sorted(shared + unshared, key=lambda i: -np.mean([drop[n][i] for n in names]))  # one order
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.2 * len(names) + 0.4), sharex=True, squeeze=False,
                             layout="constrained")
    if title:
        fig.suptitle(title, fontsize=10)
    for ax, name in zip(axes[:, 0], names):
        ax.bar(range(len(order)), drop[name][order],
               color=["tab:orange" if i in shared else "tab:gray" for i in order])
        ax.set_xticks(range(len(order)), [CONCEPTS[i] for i in order], rotation=90, fontsize=7)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("drop (pp)")
        ax.set_title(f"{name}: mean drop {r['methods'][name]['drop_shared']:.1f} (shares a word with "
                     f"an erased concept, orange) vs {r['methods'][name]['drop_unshared']:.1f} (none, grey)",
                     fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- a paper's table (protocol.py)
# UnlearnDiffAtk's table (ECCV 2024), nudity, 142 prompts: ASR pre / post attack in %
PAPER_ATTACKS = {"ESD": (20.42, 76.05), "UCE": (21.83, 79.58)}


def slug(text):
    """A name for a folder: "Ajin: Demi Human" -> "ajin__demi_human"."""
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")


def pm(d):
    """evaluate.py's {mean, std} (or a number) as text."""
    return "" if d is None else f"{d['mean']:.2f} ± {d['std']:.2f}" if isinstance(d, dict) else f"{d:.2f}"


def read(args, table, name):
    path = os.path.join(args.out, "scores", table, f"{name}.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def paper(table, model):
    """The paper's row for one of our models (Table 2's ESD is its ESD-u)."""
    key = {"sd": "SD", "esd": "ESD-u" if table == "2" else "ESD"}.get(model, model.upper())
    if table == "2" and key in evaluate.PAPER_TABLE2:  # with the FID column
        return evaluate.PAPER_TABLE2[key] + evaluate.PAPER_FID.get(key.replace("-u", ""), ())
    return {"1": evaluate.PAPER_TABLE1, "2": evaluate.PAPER_TABLE2, "4": evaluate.PAPER_TABLE4,
            "attacks": PAPER_ATTACKS}.get(table, {}).get(key)


def results(args, stages):
    """Our numbers per model (mean ± std over splits or artists) with the paper's beside them."""
    t, methods = args.table, args.methods
    rows = {}
    if t == "1":
        for m in ["sd", *methods]:
            r = read(args, "1", m)
            rows[m] = dict(ours={k: r[k] for k in ("ESR-1", "ESR-5", "PSR-1", "PSR-5")} if r else None,
                           splits=args.splits)
    elif t == "2":
        for m in ["sd", *methods]:
            r, f = read(args, "2", m), read(args, "2", f"{m}-fid")
            ours = {k: r[k] for k in r if k.startswith("NER-")} if r else None
            if ours is not None and f:
                ours["FID"] = f["fid"]
            rows[m] = dict(ours=ours)
    elif t == "4":
        for m in methods:
            per = [(read(args, "4", f"{m}-{slug(a)}-clip"), read(args, "4", f"{m}-{slug(a)}-lpips")) for a in args.artists]
            if any(c is None or lp is None for c, lp in per):
                rows[m] = dict(ours=None)
                continue
            cols = {"erase CLIP": [c["groups"]["erase"]["mean"] for c, _ in per],
                    "erase LPIPS": [lp["groups"]["erase"]["mean"] for _, lp in per],
                    "retain CLIP": [c["groups"]["retain"]["mean"] for c, _ in per],
                    "retain LPIPS": [lp["groups"]["retain"]["mean"] for _, lp in per]}
            # over the artists, as evaluate.py average takes Table 1's splits
            rows[m] = dict(ours={k: evaluate.mean_std(v) for k, v in cols.items()}, artists=args.artists)
    elif t == "fig1":
        for name in [s["name"].split("/")[-1] for s in stages if s["name"].startswith("scores/fig1/")]:
            r = read(args, "fig1", name)
            rows[name] = dict(ours=r and dict(most_sensitive=list(r["delta"])[:5], delta=r["delta"]))
    else:
        for m in ["sd", *methods]:
            for kind in ("unlearndiffatk", "ringabell", "inversion"):
                path = os.path.join(args.out, "attacks", f"{m}-{kind}.json")
                if os.path.isfile(path):
                    r = json.load(open(path))
                    rows[f"{m}-{kind}"] = dict(ours=dict(ASR_pre=r["asr_pre"], ASR_post=r["asr_post"]), prompts=r["prompts"])
    for m, r in rows.items():
        r["paper"] = paper(t, m.split("-")[0]) if t != "attacks" or m.endswith("unlearndiffatk") else None
    return rows


HEADERS = {"1": ["ESR-1", "ESR-5", "PSR-1", "PSR-5"], "2": ["NER-0.3", "NER-0.5", "NER-0.7", "NER-0.8", "FID"],
           "4": ["erase CLIP", "erase LPIPS", "retain CLIP", "retain LPIPS"], "attacks": ["ASR_pre", "ASR_post"]}


def markdown(args, rows):
    """tableN.md: per model our numbers and, in the next row, the paper's."""
    t = args.table
    if t == "fig1":
        lines = ["| erased model | the 5 concepts most changed (delta, CLIP score) |", "|---|---|"]
        lines += [f"| {m} | {', '.join(f'{c} {d:.2f}' for c, d in list(r['ours']['delta'].items())[:5])} |"
                  for m, r in rows.items() if r["ours"]]
        return "\n".join(lines) + "\n\npaper (Fig. 1a): erasing \"nudity\" changes \"women\", \"men\", \"person\" most.\n"
    keys = HEADERS[t]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m, r in rows.items():
        ours = r["ours"] or {}
        lines.append(f"| {m}, ours | " + " | ".join(pm(ours.get(k)) for k in keys) + " |")
        if r["paper"]:
            lines.append(f"| {m}, paper | " + " | ".join(str(v) for v in r["paper"]) + " |"
                         + " |" * (len(keys) - len(r["paper"])))
    return "\n".join(lines) + "\n"


def table_picture(args, stages):
    """OUT/tableN.png for Tables 1, 4 and Fig. 1: a row per model (the original, then each method
    on the first split or artist), a column per class, artist or concept (its first row), 128 px."""
    key, name = {"1": ("class", "imagenette"), "4": ("artist", "artists"), "fig1": ("concept", "fig1")}.get(
        args.table, (None, None))
    first = {"1": args.splits[0], "4": slug(args.artists[0]), "fig1": "garbage_truck"}.get(args.table)
    folders = [s["argv"][s["argv"].index("--out_dir") + 1] for s in stages if s["kind"] == "sample"
               and s["name"].startswith(f"images/{name}/") and s["name"].split("/")[-1].split("-")[0] in ("sd", first)]
    if not key or not all(os.path.isfile(os.path.join(f, "prompts.csv")) for f in folders):
        return None
    rows = evaluate.read_csv(os.path.join(folders[0], "prompts.csv"))
    cols = {}
    for i, r in enumerate(rows):
        cols.setdefault(r[key], i)
    cols = dict(list(cols.items())[:10])
    small = lambda f, i: np.array(Image.open(os.path.join(f, f"{i:05d}.png")).convert("RGB").resize((128, 128)))
    path = os.path.join(args.out, f"table{args.table}.png")
    grid([[small(f, i) for i in cols.values()] for f in folders], [os.path.basename(f) for f in folders],
         "columns: " + ", ".join(cols)).save(path)
    return path
