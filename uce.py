"""Unified Concept Editing (UCE): Gandikota, Orgad, Belinkov, Materzynska, Bau, "Unified Concept
Editing in Diffusion Models", WACV 2024 (arXiv:2308.14761), its erasing edit. No training: every
cross-attention key and value projection W of the UNet (attn2.to_k, attn2.to_v) is replaced by
the closed-form minimiser of

    lam_e sum_i ||W' c_i - W c*_i||^2 + lam_p sum_j ||W' c_j - W c_j||^2 + lam ||W' - W||_F^2

c_i: rows of an erased concept's text embedding, c*_i: the aligned rows of its guide (v*_i =
W c*_i, the original output for the guide), c_j: rows of a preserved prompt (v_j = W c_j):

    W' = (lam_e sum_i W c*_i c_i^T + lam_p sum_j W c_j c_j^T + lam W)
         (lam_e sum_i c_i c_i^T + lam_p sum_j c_j c_j^T + lam I)^-1

The paper prints the closed form (its Eq. 7, as the published code's comments number it) with
no weights; lam, lam_e (erase_scale) and lam_p (preserve_scale) and every default below are the
published code's: train-scripts/train_erase.py (commit bd5fb51) of
github.com/rohitgandikota/unified-concept-editing, the script the repository's README gives
for erasing. It inverts in float32; we solve in float64.

    python erase.py --method uce --concept "garbage truck, church"              # guided to ""
    python erase.py --method uce --concept "Kelly Mckernan" --guide art --preserve "Claude Monet"

On every family: SD-1.x (keys 768 wide), SD-2.x (1024), SDXL (its 70 attn2 modules, keys 2048
wide: both encoders' token states; the pooled embedding reaches no key or value, so it plays no
part). UCE's 2025 script (trainscripts/uce_sd_erase.py, the one its README now gives, for SD and
SDXL alike) takes the last token of each prompt alone, does not preserve "" and weighs each
preserved prompt 1: --uce_tokens last --uce_no_empty --preserve_scale 1.

EAP's baseline (Bui et al., NeurIPS 2024: train-uce.py of tuananhbui89/Erasing-Adversarial-
Preservation, the same edit_model) ran --technique tensor, guided to ' ' (= ""), preserving only
'' (lam_p max(0.1, 1/1) = 1), lam 0.5, lam_e 1, keys and values, and, since its scripts pass
`--add_prompts False` to an argparse type=bool (True), every concept with its five templated
prompts: --uce_technique tensor --uce_templates object (art for artists).
"""
import json
import os
import time

import torch
from einops import rearrange

from checkpoint import save_weights
from cli import UsageError
from family import encode, tokens_of

LAM = 0.5  # lam: train_erase.py's __main__ calls edit_model(..., lamb=0.5) (edit_model's own default: 0.1)
ERASE_SCALE = 1.0  # lam_e: --erase_scale default 1; it multiplies both erase sums (mat1 and mat2)
# Keys too: edit_model(with_to_k=True) by default and __main__ does not override it. The published
# targets are the 'replace' technique (--technique default): v*_i = W c*_i (--uce_technique replace).
EDITED = ("attn2.to_k.weight", "attn2.to_v.weight")
TECHNIQUES = ("replace", "tensor")
# train_erase.py's (and train-uce.py's) additional_prompts, erased with each concept when
# --add_prompts is true; concept_type 'art' or 'object' picks the list (--uce_templates).
TEMPLATES = {"none": (),
             "object": ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
             "art": ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")}


def default_preserve_scale(n_preserved):
    """lam_p when not given: max(0.1, 1 / n), n the preserved prompts counting "" (train_erase.py)."""
    return max(0.1, 1 / n_preserved)


def tensor_targets(W, c, c_star, sizes=None):
    """UCE's 'tensor' targets for one layer W (out, d), in float64: (n, out), row i the target
    of c_i. Per erased prompt (`sizes`: its row counts, in order; None: all rows one prompt),
    with C, C* that prompt's rows: u = W C / ||W C||_F, target = W C* - <u, W C*>_F u."""
    W, c, c_star = W.double(), c.double(), c_star.double()
    out = []
    for Wc, Ws in zip((c @ W.T).split(sizes or len(c)), (c_star @ W.T).split(sizes or len(c))):
        u = Wc / Wc.norm()  # Frobenius norm over the prompt's tokens x dims
        out.append(Ws - (u * Ws).sum() * u)  # target = W c* - <u, W c*> u: W c* less its part along W c
    return torch.cat(out)


def edit(weights, c, c_star, c_pres=None, lam=LAM, erase_scale=ERASE_SCALE, preserve_scale=1.0,
         technique="replace", sizes=None):
    """UCE's closed form for every W in `weights` ({name: (out, d)}), computed in float64 and
    returned in W's dtype. c, c_star: (n, d) paired rows c_i, c*_i; c_pres: (m, d) rows c_j or
    None. technique 'replace': v*_i = W c*_i; 'tensor': v*_i = tensor_targets(W, c, c_star,
    sizes), `sizes` the erased prompts' row counts. With 'replace' every target is the layer's
    own output (v*_i = W c*_i, v_j = W c_j), so both sums factor as W times one (d, d) matrix
    that every layer shares: W' = W B A^-1; 'tensor' forms the numerator layer by layer."""
    if technique not in TECHNIQUES:
        raise ValueError(f"technique {technique!r}: one of {TECHNIQUES}")
    c, c_star = c.double(), c_star.double()
    d = c.shape[1]
    I = torch.eye(d, dtype=torch.float64, device=c.device)
    # sum_j c_j c_j^T  (d, d)
    P = torch.zeros_like(I) if c_pres is None else c_pres.double().T @ c_pres.double()
    # A = lam_e sum_i c_i c_i^T + lam_p sum_j c_j c_j^T + lam I
    A = erase_scale * c.T @ c + preserve_scale * P + lam * I
    if technique == "tensor":
        # W' = (lam_e sum_i v*_i c_i^T + W (lam_p sum_j c_j c_j^T + lam I)) A^-1, per layer
        R, out = preserve_scale * P + lam * I, {}
        for name, W in weights.items():
            Wd, dev = W.double(), W.device
            T = tensor_targets(Wd, c.to(dev), c_star.to(dev), sizes)  # (n, out)
            num = erase_scale * T.T @ c.to(dev) + Wd @ R.to(dev)
            out[name] = torch.linalg.solve(A.to(dev), num, left=False).to(W.dtype)
        return out
    # W B = lam_e sum_i W c*_i c_i^T + lam_p sum_j W c_j c_j^T + lam W
    B = erase_scale * c_star.T @ c + preserve_scale * P + lam * I
    # M = B A^-1, solved (X A = B) rather than inverted
    M = torch.linalg.solve(A, B, left=False)
    # W' = (W B) A^-1 = W M
    return {name: (W.double() @ M.to(W.device)).to(W.dtype) for name, W in weights.items()}


def last_token(m, prompt):
    """Position of the prompt's last token in its 77 ids: attention_mask.sum() - 2, as the
    published code computes it (<|startoftext|> is at 0, so "" gives 0)."""
    ids = m.tokenizer(prompt, padding="max_length", max_length=m.tokenizer.model_max_length,
                      truncation=True)
    return sum(ids.attention_mask) - 2


def token_rows(m, concepts, guides, preserve=(), last_only=False, with_sizes=False):
    """The rows UCE fits: c (n, d) and c_star (n, d), paired, for each (concept, guide), and
    c_pres (every position of every preserved prompt, (77 |preserve|, d)) or None.
    train_erase.py: the concept's rows run from its last token (the end of its last word) to
    the end of the sequence, <|endoftext|> and padding included; the guide's from its own last
    token ("" and " ": <|startoftext|>), aligned there; the longer tail is cut to the shorter.
    last_only: the last token alone, for erased, guide and preserved prompts, as the later
    rewrite trainscripts/uce_sd_erase.py does (lam 0.5, lam_e 1, lam_p 1, no "" preserved).
    with_sizes: a 4th item, each pair's row count (what 'tensor' normalises over)."""
    c, c_star = [], []
    for concept, guide in zip(concepts, guides):
        e, g = tokens_of(encode(m, [concept, guide]))  # (77, D) each
        L, G = last_token(m, concept), last_token(m, guide)
        n = 1 if last_only else len(e) - max(L, G)
        c.append(e[L:L + n])
        c_star.append(g[G:G + n])
    sizes = ([len(x) for x in c],) * with_sizes
    if not preserve:
        return (torch.cat(c), torch.cat(c_star), None) + sizes
    E = tokens_of(encode(m, list(preserve)))  # (|P|, 77, D)
    if last_only:
        return (torch.cat(c), torch.cat(c_star), E[range(len(E)), [last_token(m, p) for p in preserve]]) + sizes
    return (torch.cat(c), torch.cat(c_star), rearrange(E, "p t d -> (p t) d")) + sizes


def erase_prompts(concepts, guides, templates="none"):
    """The (prompt, guide) pairs erased: each concept, then its TEMPLATES[templates] prompts, all
    to the concept's guide as it is (untemplated), as UCE's and EAP's scripts map them."""
    pairs = []
    for concept, guide in zip(concepts, guides):
        pairs.append((concept, guide))
        pairs += [(t.format(concept), guide) for t in TEMPLATES[templates]]
    return [p for p, _ in pairs], [g for _, g in pairs]


def run(m, args):
    """Edit m.unet's attn2 to_k / to_v for args.concepts -> args.guide, keeping args.preserve.
    Resolves the None settings to the published defaults on `args` (config.json records them).
    Returns ({parameter name: new tensor}, info); m.unet itself is left as it was."""
    tic = time.perf_counter()
    concepts = args.concepts
    guides = [g.strip() for g in args.guide.split(",")]  # "" (the default) is the empty prompt
    if len(guides) == 1:
        guides = guides * len(concepts)
    if len(guides) != len(concepts):
        raise UsageError(f"--guide has {len(guides)} items: give one, or one per --concept ({len(concepts)})")
    concepts, guides = erase_prompts(concepts, guides, args.uce_templates)
    # train_erase.py preserves '' always: retain_texts = [''] + preserve_concepts (2025: not)
    preserve = [""] * (not args.uce_no_empty) + [p.strip() for p in (args.preserve or "").split(",") if p.strip()]
    both = [p for p in preserve if p.lower() in {c.lower() for c in concepts}]
    if both:
        raise UsageError(f"--preserve names an erased concept: {both[0]}")
    if args.uce_lambda is None:
        args.uce_lambda = LAM
    if args.erase_scale is None:
        args.erase_scale = ERASE_SCALE
    if args.preserve_scale is None:
        args.preserve_scale = default_preserve_scale(max(len(preserve), 1))
    if args.uce_lambda < 0 or args.erase_scale <= 0 or args.preserve_scale < 0:
        raise UsageError("--uce_lambda and --preserve_scale must be >= 0, --erase_scale > 0")
    c, c_star, c_pres, sizes = token_rows(m, concepts, guides, preserve, last_only=args.uce_tokens == "last",
                                          with_sizes=True)
    weights = {n: p.detach() for n, p in m.unet.named_parameters() if n.endswith(EDITED)}
    try:
        edited = edit(weights, c, c_star, c_pres, args.uce_lambda, args.erase_scale, args.preserve_scale,
                      args.uce_technique, sizes)
    except torch.linalg.LinAlgError:
        raise UsageError("the UCE system is singular: use --uce_lambda > 0") from None
    info = dict(edited=len(edited), erase_prompts=concepts, erase_rows=len(c),
                preserve_rows=0 if c_pres is None else len(c_pres), seconds=round(time.perf_counter() - tic, 3))
    return edited, info


SETTINGS = ("model", "concept", "concepts", "method", "guide", "preserve", "uce_lambda", "erase_scale",
            "preserve_scale", "uce_tokens", "uce_no_empty", "uce_technique", "uce_templates", "device")


def write(m, args):
    """erase.py --method uce: no loop. The edited attn2 to_k / to_v weights, config.json (UCE's
    settings, its defaults resolved) and log.jsonl (one line), as the trained methods write them."""
    edited, info = run(m, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(dict({k: getattr(args, k) for k in SETTINGS}, family=m.family), f, indent=1)
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        f.write(json.dumps(info) + "\n")
    return save_weights(args, m.family, edited)
