"""Algorithm 2 (Adversarial Erasure Training) and its baselines, on any SD-1.x, SD-2.x or SDXL
checkpoint (family.py knows the families; nothing here asks which one it is).

    python erase.py --concept "garbage truck"                          # EAP, cross-attention (ESD-x)
    python erase.py --concept "nudity" --train_method noxattn --K 50   # Section 5.2
    python erase.py --concept "garbage truck" --model stabilityai/stable-diffusion-xl-base-1.0

Methods (--method), and what differs between them (`preserved`, `target_concept`,
`sampled_concept`, `sampler`, the one place that says it):
- eap:   Eq. 5, L1 + lambda L2 with c_a = G(pi) R found by Algorithm 1 (search.py);
- esd:   Eq. 3, naive erasure, no preservation;
- fixed: Eq. 4 with one fixed c_a = --preserve (Fig. 1b: "", "lexus", "road");
- age:   Adaptive Guided Erasure: the target c_n is replaced by the Gumbel mixture c_t, which
         is also the preserved concept (L2 on z_r sampled with c_t, as AGE's train_age.py does);
- ca:    Concept Ablation (Kumari et al. 2023) as its code trains (ca.py): the original model's
         images of the anchor c*, noised at t ~ U{0..T-1}, || eps_theta'(x_t, c_e) - eps_theta(x_t,
         c*) ||^2 and a prior term; --ca_mode trajectory: z_t on the frozen DDIM trajectory of c*;
- uce:   Unified Concept Editing (Gandikota et al. 2024): no training loop, a closed-form edit
         of every cross-attention key and value projection (uce.py).

literal.py transcribes the same loop the slow obvious way (two UNets, unbatched forwards);
tests/test_literal.py proves the two equal on the same random draws, on every family.

Writes to --out: weights.safetensors (the trained UNet parameters only, under the UNet's own
names, the family in its metadata), config.json (the resolved settings) and log.jsonl (one line
per model update).
"""
import argparse
import json
import os
import time
import warnings

import torch
from tqdm import trange

import ca
import checkpoint
import lora
import search
import uce
from cli import UsageError, default_device, one_line_errors, run_cli
from family import SD14, ddim, empty, encode, eps, load_model
from losses import L1, L2, erase_target, in_space, total
from params import TRAIN_METHODS, frozen, low_precision, split, trained_parameter_names

METHODS = ("eap", "esd", "fixed", "age", "uce", "ca")


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description="Erase concepts from an SD-1.x, SD-2.x or SDXL UNet."))
    p.add_argument("--model", default=SD14, help="hub id, diffusers folder, or 'toy'")
    p.add_argument("--concept", required=True, help="concept(s) to erase, comma-separated: E")
    p.add_argument("--method", default="eap", choices=METHODS)
    p.add_argument("--preserve", help="fixed: c_a (\"\" is the empty concept); uce: the concepts "
                                      "to preserve, comma-separated (optional)")
    # UCE (Gandikota et al. 2024): a closed-form edit of every attn2.to_k / to_v (uce.py)
    p.add_argument("--guide", default="", help="uce: c*, what each erased concept maps to: one for "
                                                 "all, or one per --concept, comma-separated")
    p.add_argument("--uce_lambda", type=float, default=None, help="uce: lambda (uce.py's default)")
    p.add_argument("--erase_scale", type=float, default=None, help="uce: weight of the erased terms")
    p.add_argument("--preserve_scale", type=float, default=None, help="uce: lambda_p")
    p.add_argument("--uce_tokens", default="tail", choices=["tail", "last"],
                   help="uce: the rows fitted: from each prompt's last token to the end (UCE's 2023 "
                        "script) or its last token alone (its 2025 script)")
    p.add_argument("--uce_no_empty", action="store_true", help="uce: do not preserve \"\" (2025 script)")
    p.add_argument("--uce_technique", default="replace", choices=["replace", "tensor"],
                   help="uce: targets W c* (replace) or W c* less its part along W c (tensor: EAP's runs)")
    p.add_argument("--uce_templates", default="none", choices=["none", "object", "art"],
                   help="uce: also erase 5 templated prompts per concept (\"photo of {c}\"...; EAP's runs)")
    # Concept Ablation (Kumari et al. 2023, model-based): c_e's noise prediction moves to the anchor's
    p.add_argument("--anchor", help="ca: the anchor concept c*, one for all or one per --concept "
                                    "(default: a multi-word concept's last word, 'garbage truck' -> 'truck')")
    p.add_argument("--ca_target", default="frozen", choices=["frozen", "trained"],
                   help="ca: the anchor's prediction from the frozen model (the objective CA derives) "
                        "or from the model being trained, under no_grad (CA's published code)")
    ca.add_arguments(p)  # --ca_mode, --ca_images, --ca_guidance, --ca_prior
    p.add_argument("--train_method", default=None, choices=TRAIN_METHODS,
                   help="default xattn; ca (images): xattn-strict, CA's attn2 to_k and to_v")
    # a LoRA adapter instead of the full parameters (lora.py): theta' = W + (alpha / r) B A
    p.add_argument("--lora_rank", type=int, default=0, help="r of a LoRA adapter (0: train the full parameters)")
    p.add_argument("--lora_alpha", type=float, default=None, help="the adapter's alpha (default: r)")
    p.add_argument("--lora_format", default="diffusers", choices=["diffusers", "kohya"],
                   help="diffusers' pytorch_lora_weights.safetensors, or kohya's (A1111, ComfyUI)")
    p.add_argument("--lora_dtype", default="fp16", choices=["fp16", "fp32"], help="the adapter file's dtype")
    # Section 5 / Appendix B.1: 1000 steps, batch 1, Adam, lr 1e-5, lambda 1, K 100 (50 nudity)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lam", type=float, default=1.0, help="lambda, weight of L2")
    p.add_argument("--K", type=int, default=100, help="candidates per erased concept")
    # Algorithm 1. Printed (B.1): N_iter 2, eta 1e-3. Published code: one ascent step per model
    # update (--n_iter 1) with eta 1e-2, Adam on pi.
    p.add_argument("--n_iter", type=int, default=2, help="N_iter, ascent steps per update")
    p.add_argument("--eta", type=float, default=1e-3, help="step size of the ascent on pi")
    p.add_argument("--pi_optim", default="adam", choices=["adam", "sgd", "normalized"],
                   help="normalized (--search pgd only): the published pgd step, c_a += eta g/||g|| ||c_a||")
    # Algorithm 1 as printed differentiates L2 through both models; the published code computes
    # the frozen eps_theta under no_grad, so pi's gradient flows through eps_theta' only
    p.add_argument("--pi_grad", default="both", choices=["both", "trained"],
                   help="pi's gradient through both UNets (printed) or the trained one (code)")
    p.add_argument("--tau", type=float, default=2.0, help="Gumbel-Softmax temperature")
    p.add_argument("--soft", dest="hard", action="store_false", help="soft Gumbel-Softmax")
    p.add_argument("--gumbel_topk", type=int, default=0,
                   help="AGE's published code: keep the N largest Gumbel-Softmax weights, "
                        "renormalised (0: all); soft only, hard ignores it as AGE's code does")
    p.add_argument("--search", default="gumbel", choices=["gumbel", "pgd"])
    p.add_argument("--vocab", default="default",
                   help="FILE (one concept a line), default (the published list), wordfreq, clip, clip-words, imagenet")
    p.add_argument("--keep_erased", action="store_true", help="keep E in R (published code)")
    p.add_argument("--select", default="similar", choices=["similar", "kmeans", "kmeans-sklearn"])
    p.add_argument("--k_closest", type=int, default=1000, help="first stage of --select kmeans")
    # z_t as the published code: DDIM from noise with the model being trained, guidance 3
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--start_guidance", type=float, default=3.0)
    p.add_argument("--l2_on", default="z_r", choices=["z_r", "z"],
                   help="L2's latent: z_r sampled with c_a (printed), or z sampled with c_e (train-esd-preserve.py)")
    p.add_argument("--sampler", default=None, choices=["trained", "frozen"],
                   help="the model z_t is sampled with: the one being trained (EAP's and ESD's 2023 "
                        "code, the default) or the frozen original (ESD's current code; CA always)")
    p.add_argument("--timestep", default="matched", choices=["matched", "published"],
                   help="matched: the UNet is queried at the timestep z_t sits at; published: "
                        "the published sampler's stop and timestep band (see `when`)")
    p.add_argument("--negative_guidance", type=float, default=0.0, help="eta_neg (code: 1)")
    p.add_argument("--loss_space", default="eps", choices=["eps", "x0"], help="code: x0")
    p.add_argument("--empty", default="encoded", choices=["encoded", "zeros"],
                   help="c_n, the empty concept: \"\" encoded (EAP's c_n; ESD's SDXL code) or zeros "
                        "(diffusers' SDXL unconditional, force_zeros_for_empty_prompt)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="bf16: the no-grad DDIM sampling of z_t and z_r under bf16 autocast; the "
                        "loss forwards stay fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--grad_checkpointing", action="store_true", help="less memory, more time")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA; the first "
                   "updates compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device())
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "eap"))
    p.add_argument("--out", default="out")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N updates")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    args = p.parse_args(argv)
    args.concepts = [c.strip() for c in args.concept.split(",")]
    if not all(args.concepts):
        raise UsageError("--concept is empty or has an empty item")
    if args.method == "fixed" and args.preserve is None:
        raise UsageError("--method fixed needs --preserve (use --preserve \"\" for the empty concept)")
    for name in ("steps", "K", "n_iter", "ddim_steps", "ca_images"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.pi_optim == "normalized" and args.search != "pgd":
        raise UsageError("--pi_optim normalized scales a step by ||c_a||: --search pgd only (pi starts at 0)")
    if not 0 <= args.gumbel_topk <= args.K:
        raise UsageError(f"--gumbel_topk must be between 0 and --K ({args.K})")
    if args.lora_rank < 0 or (args.lora_alpha is not None and args.lora_alpha <= 0):
        raise UsageError("--lora_rank must be at least 1 (0: the full parameters), --lora_alpha above 0")
    if args.lora_rank and args.method == "uce":
        raise UsageError("--method uce is a closed-form full edit: export.py lora turns its weights into an adapter")
    if args.method == "ca":
        args.anchors = per_concept(args.anchor, args.concepts, "--anchor")
        if args.anchor is None:  # CA's objects: an instance goes to its category (grumpy cat -> cat)
            single = [c for c in args.concepts if len(c.split()) < 2]
            if single:
                raise UsageError(f"--method ca needs --anchor: '{single[0]}' is one word, so it has "
                                 "no category word to default to")
            args.anchors = [c.split()[-1] for c in args.concepts]
        if args.negative_guidance:
            raise UsageError("--negative_guidance is ESD's target; ca's target is the anchor's prediction")
        if args.sampler == "trained":
            raise UsageError("--method ca samples the anchor's images with the original model (--sampler frozen)")
        args.ca_prior = [args.ca_prior == "on" or (args.ca_prior == "auto" and ca.overlaps(c, a))
                         for c, a in zip(args.concepts, args.anchors)]
    args.sampler = args.sampler or ("frozen" if args.method == "ca" else "trained")
    args.train_method = args.train_method or ("xattn-strict" if ca.images(args) else "xattn")
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def per_concept(value, concepts, flag):
    """A comma-separated flag with one item for every concept, or one per concept (None: None)."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if len(items) not in (1, len(concepts)):
        raise UsageError(f"{flag} has {len(items)} items; give one, or one per --concept ({len(concepts)})")
    return items * len(concepts) if len(items) == 1 else items


# ---------------------------------------------------------------------------- what differs between methods
def searched(args):
    """Whether c_a comes from Algorithm 1 (eap, age)."""
    return args.method in ("eap", "age")


def preserved(args, S, C, d):
    """This update's preserved concept c_a and its draw: one draw of G(pi) R (Algorithm 1: eap,
    age), the fixed --preserve (fixed), or none (esd, ca: no L2)."""
    if searched(args):
        drawn = search.draw(S[d.i], args, d.g)
        return drawn["c_a"], drawn
    return C.fixed, None


def target_concept(args, C, i, c_a):
    """The concept whose frozen prediction L1 aims at: c_n (Eq. 3), AGE's c_t = c_a, CA's anchor."""
    return {"age": c_a, "ca": C.anchor[i:i + 1] if C.anchor is not None else None}.get(args.method, C.n)


def sampled_concept(args, C, i):
    """The concept z_t is sampled with: c_e, or (CA) its anchor c*, whose images CA trains on."""
    return C.anchor[i:i + 1] if args.method == "ca" else C.e[i:i + 1]


def sampler(args, m, M):
    """The eps function z_t and z_r are sampled with: theta' as it is now, or theta (--sampler
    frozen; CA), in bf16 copies when sampling runs in bf16 (M.low: the frozen ones, made once)."""
    if args.sampler == "frozen":
        return frozen(m, M.theta, M.low and {**M.low["fixed"], **M.low["theta"]})
    values = {**M.low["fixed"], **low_precision(m.unet, M.theta_prime)} if M.low else None
    return lambda z, t, c: eps(m, z, t, c, values)


def concepts(m, args):
    """Every text embedding, computed once: c_e for each erased concept, c_n, the fixed c_a, the
    anchors; (n, L, D) each."""
    return argparse.Namespace(e=encode(m, args.concepts), n=empty(m, args.empty == "zeros"),
                              fixed=encode(m, [args.preserve]) if args.method == "fixed" else None,
                              anchor=encode(m, args.anchors) if args.method == "ca" else None)


# ---------------------------------------------------------------------------- the random draws, the timesteps
def draws(gen, args, n_concepts, shape, T=1000):
    """Every random draw of one model update, in one fixed order: the index i of c_e ~ E, z_T,
    t_enc ~ U{0..ddim_steps-1}, the Gumbel noise g of G(pi) (K values), and for --timestep
    published the UNet's query t from the band [T t_enc / n, T (t_enc + 1) / n). erase.py and
    literal.py both take their randomness from here, so that on one seed they see the same."""
    n = args.ddim_steps
    i = int(torch.randint(n_concepts, (1,), generator=gen))
    z_T = torch.randn(shape, generator=gen)
    t_enc = int(torch.randint(n, (1,), generator=gen))
    g = search.gumbel_noise((args.K,), gen) if searched(args) and args.search == "gumbel" else None
    t = None
    if args.timestep == "published":
        t = int(torch.randint(round(T * t_enc / n), round(T * (t_enc + 1) / n), (1,), generator=gen))
    c = ca.draw(gen, args, i, shape, T) if ca.images(args) else None  # CA's image, t and noise (ca.py)
    return argparse.Namespace(i=i, z_T=z_T, t_enc=t_enc, g=g, t=t, ca=c)


def when(args, ts, d):
    """(the DDIM index z_T is taken at, the index the sampling stops at, the UNet's query
    timestep t, the timestep whose abar the x0 loss space uses), for draws d; ts: the DDIM
    timesteps, noisiest first (981, 961, ..., 1).
    matched: z_T at ts[0], t_enc steps, then z_t sits at ts[t_enc], and t and x0 use that timestep.
    published: the published CompVis sampler drops its noisiest timestep (`timesteps[:-1]`), so
    z_T is taken at ts[1] (961); it counts its index down from n - 2 and stops after the step
    whose index + 1 == t_enc (t_enc <= 1: at the clean end), i.e. at ts[n + 1 - t_enc], after
    min(n - 1, n - t_enc) steps; z then sits two DDIM steps below the band its query t is drawn
    from (t_enc >= 2), and x0 uses abar at DDIM index t_enc (counted from the clean end),
    ts[n - 1 - t_enc]."""
    n = args.ddim_steps
    if args.timestep == "matched":
        return 0, d.t_enc, ts[d.t_enc], ts[d.t_enc]
    return 1, min(n, n + 1 - d.t_enc), d.t, ts[n - 1 - d.t_enc]


def batched(model, pairs, t):
    """One UNet forward for a list of (z, c) pairs: the outputs, one per pair."""
    return model(torch.cat([z for z, _ in pairs]), t, torch.cat([c for _, c in pairs])).chunk(len(pairs))


# ---------------------------------------------------------------------------- Algorithm 2
def models(args, m):
    """theta' (the trained subset of the UNet's parameters), theta (a copy of their original
    values), eps_theta (the frozen model: the same UNet with theta swapped in, no second UNet in
    memory), eps_theta' (the model being trained), and the precision policy: L2 is the difference
    of two nearly equal UNet outputs, which bf16 rounding swamps, so every forward that a loss or a
    gradient sees runs in fp32; only the no-grad DDIM sampling of z_t and z_r may run under bf16
    autocast (README: the measured effect), with bf16 copies of the frozen weights made once
    (autocast casts every frozen weight again at every call)."""
    unet = m.unet
    if args.device == "cpu" and sum(p.numel() for p in unet.parameters()) > 1e8:
        warnings.warn("running a full-size UNet on the CPU: impractically slow (about a minute "
                      "per forward+backward); use a CUDA GPU, or --model toy")
    config = None
    if args.lora_rank:  # theta' is the adapter, theta the UNet with it off: no copy
        targets = lora.target_modules(unet, args.train_method, trained_parameter_names(unet, args.train_method))
        theta_prime, config = lora.add(unet, targets, args.lora_rank, args.lora_alpha, args.seed)
        theta = {}
    else:
        theta_prime, theta = split(unet, args.train_method)
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode; SD's UNet has no dropout
    bf16 = args.precision == "bf16"
    low = dict(fixed=low_precision(unet, {n: p for n, p in unet.named_parameters() if n not in theta_prime}),
               theta=low_precision(unet, theta) if args.sampler == "frozen" else None) if bf16 else None
    if args.compile:
        unet.compile(dynamic=False)  # in place: parameter names unchanged for functional_call
    return argparse.Namespace(theta_prime=theta_prime, theta=theta, low=low, eps_theta=frozen(m, theta), lora=config,
                              eps_theta_prime=lambda z, t, c: eps(m, z, t, c),
                              amp=torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=bf16))


def searches(args, m, C):
    """Algorithm 1's state for each erased concept (eap, age): R embedded once, the K candidates
    nearest c_e and their logits pi; then the text encoders leave the GPU (every embedding is made)."""
    S = []
    if searched(args):
        words = search.load_vocab(args.vocab, m.tokenizer, args.concepts, args.keep_erased)
        S = search.new_search(m, words, search.embed_vocab(m, words, args.cache_dir), C.e, args, args.device)
    for enc in m.text_encoders:
        enc.to("cpu")
    return S


def start(args, m, theta_prime, opt, S, gen):
    """--out's config.json and log.jsonl (appended to on --resume), the step to start from. Only
    now is anything written: bad input has been refused before."""
    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "save_every", "out")}
    k = checkpoint.resume(args, config, theta_prime, opt, S, gen, args.device)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(dict(config, family=m.family), f, indent=1)
    return k, open(os.path.join(args.out, "log.jsonl"), "a")


def record(args, k, d, t, losses, S, drawn, tic):
    """One line of log.jsonl: the update's losses, timesteps, concepts, time, peak GPU memory."""
    loss, l1, l2 = (x.item() for x in losses)
    rec = dict(step=k, loss=loss, l1=l1, l2=l2, t=int(t), t_enc=d.t_enc, c_e=args.concepts[d.i],
               c_a=search.drawn(S[d.i], drawn, args) if searched(args) else args.preserve)
    if args.method == "ca":
        rec["anchor"] = args.anchors[d.i]
    if searched(args) and args.search == "gumbel":
        rec["pi_argmax"] = search.chosen(S[d.i], args)
    rec["seconds"] = round(time.perf_counter() - tic, 4)
    if args.device.startswith("cuda"):  # the update's peak, sampling included
        rec["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(args.device) / 2 ** 30, 3)
    return rec


def main(argv=None, m=None):
    """Algorithm 2, with Algorithm 1 inside it. `m` (family.load_model's result) skips loading:
    bench.py and the toy benchmark pass their own."""
    args = parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device here")
    m = m or load_model(args.model, device, vae=False)  # training never decodes
    if args.method == "uce":
        return uce.write(m, args)
    M = models(args, m)  # theta', theta, eps_theta, eps_theta'
    C = concepts(m, args)  # text embeddings, computed once
    A = ca.anchor_latents(m, args, C.anchor, C.n) if ca.images(args) else None  # CA's anchor images
    S = searches(args, m, C)  # Algorithm 1's candidates and pi, per erased concept
    opt = torch.optim.Adam(M.theta_prime.values(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)  # every random draw, so a resume replays them
    abar = m.scheduler.alphas_cumprod.to(device)
    m.scheduler.set_timesteps(args.ddim_steps)
    ts = m.scheduler.timesteps.tolist()  # DDIM timesteps, noisiest first
    shape = (1, m.unet.config.in_channels, m.unet.config.sample_size, m.unet.config.sample_size)
    first, log = start(args, m, M.theta_prime, opt, S, gen)

    bar = trange(first, args.steps, initial=first, total=args.steps, desc=f"{args.method}")
    for k in bar:
        tic = time.perf_counter()
        d = draws(gen, args, len(args.concepts), shape, m.scheduler.config.num_train_timesteps)
        c_e = C.e[d.i:d.i + 1]  # c_e ~ E
        first, stop, t, t_x0 = when(args, ts, d)
        if d.ca:  # CA as its code trains: the UNet queried at the anchor image's noise level
            t = t_x0 = d.ca.t
        t = torch.tensor(t, device=device)  # a tensor, as the UNet makes it: compile sees no new constant
        c_a, drawn = preserved(args, S, C, d)  # Algorithm 1's draw, the fixed concept, or none

        # z_t (and z_r, with this update's c_a): DDIM from the same z_T, guided by start_guidance
        # with c_n, `stop` steps, one batched no-grad loop (CA: z_t from its anchor)
        # with --l2_on z, L2 too is taken on z (the published fixed-concept code): no z_r
        with_r = c_a is not None and args.l2_on == "z_r"
        conds = torch.cat([sampled_concept(args, C, d.i)] + ([c_a] if with_r else []))
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        if d.ca:  # CA: an anchor image noised forward, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
            z = z_r = ca.noised(A[d.i, d.ca.j:d.ca.j + 1], d.ca.t, d.ca.noise.to(device, m.unet.dtype), abar)
        else:
            with torch.no_grad(), M.amp:
                zs, _ = ddim(sampler(args, m, M), m.scheduler,
                             d.z_T.to(device, m.unet.dtype).expand(len(conds), -1, -1, -1), conds,
                             C.n.expand(len(conds), -1, -1), args.start_guidance, args.ddim_steps, stop, start=first)
            z, z_r = zs[:1].to(m.unet.dtype), zs[1:].to(m.unet.dtype)  # back from bf16 sampling
            z_r = z_r if with_r else z

        def sp(e, zz):  # eps (printed) or predicted x0 (published code)
            return in_space(e, zz, abar[t_x0], args.loss_space)

        # Algorithm 1: N_iter ascent steps on pi, maximising L2 on z_r at this update's c_a
        if searched(args):
            def l2_of(c):
                if args.pi_grad == "both":  # the printed gradient, through both models
                    eps_a = M.eps_theta(z_r, t, c)
                else:  # the published code's: the frozen output is a constant
                    with torch.no_grad():
                        eps_a = M.eps_theta(z_r, t, c.detach())
                return L2(sp(M.eps_theta_prime(z_r, t, c), z_r), sp(eps_a, z_r))
            scale = z_r.numel() if args.pi_optim == "sgd" else 1.0
            for _ in range(args.n_iter):
                search.ascend(S[d.i], l2_of, drawn, args, scale)

        # Algorithm 2, outer min over theta': the frozen forwards in one batch (L1's target
        # concept, c_e where negative guidance needs it, c_a on z_r for L2), the trained in another
        frozen_in = [(z, target_concept(args, C, d.i, c_a))] + ([(z, c_e)] if args.negative_guidance else []) \
            + ([(z_r, c_a)] if c_a is not None else [])
        trained_in = [(z, c_e)] + ([(z_r, c_a)] if c_a is not None else [])
        prior = d.ca and d.ca.prior and ca.prior_input(A, d, abar, device)  # CA's prior: (x_t', eps', t')
        if prior:
            trained_in.append((prior[0], C.anchor[d.i:d.i + 1]))
        with torch.no_grad():  # CA's code takes its target from the model being trained
            out = batched(M.eps_theta_prime if args.ca_target == "trained" and args.method == "ca" else M.eps_theta,
                          frozen_in, t)
        eps_p = batched(M.eps_theta_prime, trained_in, torch.stack([t, prior[2]]) if prior else t)
        # Eq. 3's target (eta_neg = 0), the published code's negative guidance, AGE's c_t, CA's anchor
        target = erase_target(out[0], out[1] if args.negative_guidance else None, args.negative_guidance)
        l1 = L1(sp(eps_p[0], z), sp(target, z))
        l2 = L2(sp(eps_p[1], z_r), sp(out[-1], z_r)) if c_a is not None else torch.zeros((), device=device)
        if prior:  # CA: || eps_theta'(x_t', c*) - eps' ||^2, the anchor kept (prior_loss_weight: lambda)
            l2 = L2(*(in_space(e, prior[0], abar[prior[2]], args.loss_space) for e in (eps_p[1], prior[1])))
        loss = total(l1, l2, args.lam)  # Eq. 4/5: L1 + lambda L2
        if not torch.isfinite(loss):
            raise UsageError(f"the loss became {float(loss)} at step {k}; try a lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        rec = record(args, k, d, t, (loss, l1, l2), S, drawn, tic)
        log.write(json.dumps(rec) + "\n")
        bar.set_postfix(l1=f"{rec['l1']:.4f}", l2=f"{rec['l2']:.4f}", c_a=rec["c_a"])
        if args.save_every and (k + 1) % args.save_every == 0 and k + 1 < args.steps:
            log.flush()
            checkpoint.save(args.out, k + 1, M.theta_prime, opt, S, gen)
    log.close()
    if M.lora:  # the adapter file, then the finished run's checkpoint goes
        path = lora.save(args.out, m.unet, M.lora, m.family, dict(model=str(args.model), method=args.method,
                         concept=args.concept, train_method=args.train_method), args.lora_format, args.lora_dtype)
        return checkpoint.finished(args.out, path)
    return checkpoint.save_weights(args, m.family, {n: p.detach() for n, p in M.theta_prime.items()})


if __name__ == "__main__":
    run_cli(main)
