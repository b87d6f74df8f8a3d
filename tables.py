"""The toy benchmark's numbers and pictures (benchmark.py runs it): Table 1's columns per run
(ESR-1, PSR-1, the accuracy drop on concepts that share a word with E and on those that share
none), mean ± std over runs, the verdict on EAP against ESD, the robustness table, the
original-vs-methods grid and Fig. 1a's sensitivity bars."""
import numpy as np
from PIL import Image, ImageDraw

import attack
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
