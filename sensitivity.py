"""Fig. 2 (Section 3.2) as the published code measures it: how much an erasure changed the model's
output for every concept of a vocabulary.

For each concept c: -|| eps_theta'(z, t, c) - eps_theta(z, t, c) ||_2, the sanitized and the
original UNet's noise predictions at one latent z and one timestep t, without guidance (EAP's
gen_embedding_matrix.py, compare_two_models). 0: the erasure left c alone; the more negative, the
more c moved. z: DDIM with the published CompVis sampler (z_T taken at t = 961, erase.when's
`published` stop) from one Gaussian z_T, run by the sanitized model on "a photo" with guidance 3,
stopped at --time_step (20 of 50: 30 steps, z at t = 361); t drawn from [20 time_step, 20
time_step + 20). The published run adds 20 concepts of its own to the vocabulary (--extra).

    python sensitivity.py --weights runs/nudity/weights.safetensors --vocab clip --out results/fig2_nudity

Writes to --out: scores.csv (concept, score; highest first, as published), sensitivity.json
(settings, z's and the query's timesteps, the most and least changed concepts) and
histogram.png (Fig. 2: the scores' histogram, the --mark concepts drawn on it). evaluate.py
sensitivity gives Fig. 1 (CLIP scores of generated images) and the image-similarity histogram.
"""
import argparse
import csv
import json
import os

import torch
from safetensors import safe_open
from tqdm import tqdm

import lora
import search
from cli import UsageError, default_device, one_line_errors, run_cli
from erase import when
from family import SD14, ddim, empty, encode, eps, load_model
from params import frozen, prepared

# the concepts compare_two_models appends to the vocabulary (its `customized_tokens`)
EXTRA = ["women", "men", "person", "hat", "apple", "bamboo", "notebooks", "australians", "president", "boat",
         "lexus", "money", "banana", "naked", "garbage truck", "a photo", " ", "road", "car", "bus"]


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--model", default=SD14, help="hub id, diffusers folder, or 'toy'")
    p.add_argument("--weights", required=True, help="erase.py's output: a full delta or a LoRA adapter")
    p.add_argument("--vocab", default="clip", help="search.py's vocabularies: clip (the tokenizer's "
                   "entries, as published), default, clip-words, wordfreq, imagenet, or a FILE")
    p.add_argument("--extra", default=",".join(EXTRA), help="concepts added to the vocabulary, comma-separated "
                   "(default: the published 20; '' for none)")
    p.add_argument("--start", default="a photo", help="the prompt z is sampled with")
    p.add_argument("--guidance", type=float, default=3.0, help="z's guidance (the published start_guidance)")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--time_step", type=int, default=20, help="the published sampler's till_T: where z stops")
    p.add_argument("--seed", type=int, default=0, help="z_T and t")
    p.add_argument("--mark", default="women,men,person,naked,a photo,garbage truck,road",
                   help="concepts drawn on the histogram")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default=default_device())
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not 0 <= args.time_step < args.ddim_steps:
        raise UsageError(f"--time_step must be in 0..{args.ddim_steps - 1} (--ddim_steps {args.ddim_steps})")
    if not (os.path.isfile(args.weights) and args.weights.endswith(".safetensors")):
        raise UsageError(f"weights {args.weights} is not a .safetensors file")  # before a model loads
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    return args


def original_of(m, path):
    """eps_theta beside the loaded erasure: the adapter switched off, or the original values of
    the parameters a full delta replaces (read before it is applied)."""
    apply = prepared(m, path)  # refused in one line where it does not fit m
    theta = {}
    if not lora.is_adapter(path):
        with safe_open(path, "pt") as f:
            names = set(f.keys())
        theta = {n: p.detach().clone() for n, p in m.unet.named_parameters() if n in names}
    apply()
    return frozen(m, theta)


@torch.no_grad()
def latent(m, args):
    """The published z and t: z_T ~ N(0, I) (seed), DDIM by the model as it is now (the sanitized
    one) on --start with guidance, stopped at --time_step; t from the band [T k / n, T (k + 1) / n)."""
    n, k = args.ddim_steps, args.time_step
    T = m.scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(args.seed)
    cfg = m.unet.config
    z_T = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    t = int(torch.randint(round(T * k / n), round(T * (k + 1) / n), (1,), generator=gen))
    m.scheduler.set_timesteps(n)
    first, stop, t, _ = when(argparse.Namespace(ddim_steps=n, timestep="published"), m.scheduler.timesteps.tolist(),
                             argparse.Namespace(t_enc=k, t=t))
    z, t_z = ddim(lambda z, s, c: eps(m, z, s, c), m.scheduler, z_T.to(args.device), encode(m, [args.start]),
                  empty(m, False), args.guidance, n, stop, start=first)
    return z, t, t_z


@torch.no_grad()
def scores(m, eps_orig, words, z, t, batch):
    """-|| eps_theta'(z, t, c) - eps_theta(z, t, c) ||_2 for each concept, in fp32."""
    out = []
    for i in tqdm(range(0, len(words), batch), desc=f"{len(words)} concepts"):
        c = encode(m, words[i:i + batch])
        zz = z.expand(len(c), -1, -1, -1)
        diff = eps(m, zz, t, c).float() - eps_orig(zz, t, c).float()
        out += (-diff.flatten(1).norm(dim=1)).tolist()
    return out


def histogram(path, values, marks, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(values, bins=60, color="#888")
    for j, (w, v) in enumerate(marks.items()):
        ax.axvline(v, color=f"C{j}", lw=1.5, label=f"{w.strip() or repr(w)} {v:.3g}")
    ax.set_xlabel("-|| eps_theta'(z, t, c) - eps_theta(z, t, c) ||  (0: unchanged)")
    ax.set_ylabel("concepts")
    ax.set_title(title)
    if marks:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    m = load_model(args.model, args.device, vae=False)
    eps_orig = original_of(m, args.weights)
    words = search.load_vocab(args.vocab, m.tokenizer, keep_erased=True)
    words = list(dict.fromkeys(words + [w for w in args.extra.split(",") if args.extra]))  # as a dict: once each
    z, t, t_z = latent(m, args)
    s = scores(m, eps_orig, words, z, t, args.batch)
    ranked = sorted(zip(words, s), key=lambda ws: -ws[1])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concept", "score"])
        w.writerows([c, f"{v:.6g}"] for c, v in ranked)
    named = dict(ranked)
    marks = {w: named[w] for w in args.mark.split(",") if w in named}
    histogram(os.path.join(args.out, "histogram.png"), s, marks, f"{len(words)} concepts, z at t = {t_z}, query t = {t}")
    res = dict(settings=vars(args), concepts=len(words), t_z=t_z, t=t,
               most_changed=dict(ranked[::-1][:20]), least_changed=dict(ranked[:20]), marks=marks)
    with open(os.path.join(args.out, "sensitivity.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(dict(wrote=args.out, concepts=len(words), t_z=t_z, t=t,
                          most_changed=[c for c, _ in ranked[::-1][:5]])))
    return res


if __name__ == "__main__":
    run_cli(main)
