"""Algorithm 2 with Algorithm 1 inside it, transcribed literally: the slow, obvious way.

Two full UNet copies (eps_theta frozen, eps_theta' trained), every forward unbatched,
classifier-free guidance as two forwards, the published sampler's own index loop, the
formulas written out here rather than imported. erase.py computes the same thing fast (one
UNet, batched forwards, bf16 sampling on CUDA); tests/test_literal.py runs both on the same
random draws (erase.draws) and checks that every update's L1 and L2 and the trained weights
agree. bench.py times this loop as its baseline.

One model update, as in erase.py:
  1. c_e ~ E, t_enc, z_T, and one draw of c_a = G(pi) R (its Gumbel noise g);
  2. z and z_r sampled from z_T with theta', conditioned on c_e and on c_a;
  3. N_iter ascent steps on pi, each on L2 at that z_r and that c_a (Algorithm 1);
  4. one descent step on theta' of L1 + lambda L2 (Algorithm 2).
The published code instead draws c_a and samples z and z_r anew before every ascent step and
before the model step (N_iter + 1 samplings per update); `resample=True` does that (bench.py's
published schedule). Sharing one draw and one z_r per update is the fast loop's saving by
design, so this transcription does the same by default: the README says so.

    python literal.py --model toy --concept "red circle" --vocab toy/vocab.txt --K 16 --steps 5 --out out/lit

Takes erase.py's flags (all of them but --grad_checkpointing, --save_every and --resume) and
writes the same weights.safetensors, config.json and log.jsonl, in fp32 whatever --precision.
"""
import json
import os
import time

import torch
import torch.nn.functional as F
from einops import einsum

import ca
import erase
import search
from params import trained_parameter_names
from checkpoint import save_atomic
from cli import run_cli
from family import empty, encode, encode_ids, eps, load_model, tokenize
from sample import sample_from


def sample_z(m, unet, z, c, c_n, args, t_enc):
    """DDIM (eta 0) from z = z_T with guidance start_guidance, as the published sampler runs
    it: it drops its noisiest timestep (`timesteps[:-1]`), so z_T is taken at ts[n - 2] and the
    index counts down from n - 2 (--timestep matched: from n - 1, z_T at ts[n - 1]); the step
    at `index` takes z from timestep ts[index] to ts[index - 1] (to abar_final below index 0).
    The published sampler stops
    after the step whose index + 1 == t_enc (t_enc = 0: never); --timestep matched runs
    t_enc steps."""
    n, scheduler = args.ddim_steps, m.scheduler
    ts = scheduler.timesteps.flip(0).tolist()  # ascending: 1, 21, ..., 981 for n = 50
    abar = scheduler.alphas_cumprod.to(z.device)
    first = n - 2 if args.timestep == "published" else n - 1  # published: timesteps[:-1], z_T at 961
    for index in reversed(range(first + 1)):
        if args.timestep == "matched" and index < n - t_enc:
            break
        t = ts[index]
        with torch.no_grad():
            eps_u = eps(m, z, t, c_n, unet=unet)  # epsilon whatever the UNet predicts (family.py)
            eps_c = eps(m, z, t, c, unet=unet)
        e = eps_u + args.start_guidance * (eps_c - eps_u)
        a_t = abar[t]
        a_prev = abar[ts[index - 1]] if index > 0 else scheduler.final_alpha_cumprod.to(z.device)
        x0 = (z - (1 - a_t).sqrt() * e) / a_t.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        if args.timestep == "published" and index + 1 == t_enc:
            break
    return z


def query(args, scheduler, d):
    """The UNet's timestep t and the abar the x0 loss space uses. matched: the timestep z sits
    at after t_enc steps; published: t from the band drawn in erase.draws, abar at DDIM index
    t_enc (ascending)."""
    ts = scheduler.timesteps.flip(0).tolist()
    if args.timestep == "matched":
        t = ts[args.ddim_steps - d.t_enc - 1]
        return t, scheduler.alphas_cumprod[t]
    return d.t, scheduler.alphas_cumprod[ts[d.t_enc]]


def erase_literally(m, unet_orig, args, resample=False):
    """Algorithm 2 (Algorithm 1 inside), with m.unet as theta' and unet_orig, a second copy of
    the same weights, as theta. Returns the log records and theta' (name -> tensor)."""
    device = args.device
    unet = m.unet  # theta', trained
    unet_orig.requires_grad_(False)  # theta, frozen
    names = set(trained_parameter_names(unet, args.train_method))
    theta_prime = [p.requires_grad_(True) for n, p in unet.named_parameters() if n in names]
    opt = torch.optim.Adam(theta_prime, lr=args.lr)
    c_e, c_n = encode(m, args.concepts), empty(m, args.empty == "zeros")
    c_fixed = encode(m, [args.preserve]) if args.method == "fixed" else None
    c_anchor = encode(m, args.anchors) if args.method == "ca" else None  # Concept Ablation's c*
    A = ca.anchor_latents(m, args, c_anchor, c_n) if ca.images(args) else None  # CA's anchor images
    S = []
    if erase.searched(args):  # the candidate set and pi of each erased concept (search.py)
        words = search.load_vocab(args.vocab, m.tokenizer, args.concepts, args.keep_erased)
        S = search.new_search(m, words, search.embed_vocab(m, words, args.cache_dir), c_e, args, device)
    gen = torch.Generator().manual_seed(args.seed)
    regen = torch.Generator().manual_seed(args.seed + 1)  # resample's extra draws: each update
    # still starts from erase.py's draws
    m.scheduler.set_timesteps(args.ddim_steps)
    cfg = unet.config
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    sampler = unet_orig if args.sampler == "frozen" else unet  # --sampler (CA: frozen)

    def e(net, z, t, c):  # epsilon of UNet net (v-prediction converted, SDXL's pooled row: family.eps)
        return eps(m, z, t, c, unet=net)

    def mse(a, b):  # || a - b ||^2 as a mean over elements
        return (a - b).pow(2).mean()

    def space(e, z, ab):  # eps itself, or the x0 it predicts (--loss_space x0)
        return e if args.loss_space == "eps" else (z - (1 - ab).sqrt() * e) / ab.sqrt()

    def gumbel(pi, g):  # G(pi; g) = softmax((pi + g) / tau): hard (straight-through), soft, or soft top-k
        y = ((pi + g[:len(pi)].to(device)) / args.tau).softmax(-1)  # kmeans-sklearn: maybe fewer than K
        if args.hard:
            return F.one_hot(y.argmax(-1), len(pi)).to(y.dtype) - y.detach() + y
        if args.gumbel_topk:  # AGE, soft: the weights >= the k-th largest, renormalised
            kth = y.sort(descending=True).values[min(args.gumbel_topk, len(y)) - 1]
            y = torch.where(y >= kth, y, 0.0)
            y = y / y.sum()  # y_i 1[y_i >= kth] / sum_j y_j 1[y_j >= kth]
        return y

    records = []
    for k in range(args.steps):
        tic = time.perf_counter()
        iterations = args.n_iter + 1 if erase.searched(args) else 1  # N_iter pi steps, 1 model step
        t_encs = []  # of each sampling of z (and z_r) in this update
        for it in range(iterations):
            if it == 0 or resample:
                d = erase.draws(gen if it == 0 else regen, args, len(args.concepts), shape, m.scheduler.config.num_train_timesteps)
                c_e_i = c_e[d.i:d.i + 1]
                t, ab = query(args, m.scheduler, d)
                if d.ca:  # CA as its code trains: t ~ U{0..T-1}, the anchor image's noise level
                    t, ab = d.ca.t, m.scheduler.alphas_cumprod[d.ca.t]
                ab = ab.to(device)
                if erase.searched(args):  # one draw of c_a = G(pi) R
                    s = S[d.i]
                    pi, R_K = s["x"], s["R_K"]
                    if args.search == "pgd":
                        c_a = pi.detach().clone()
                        sim = F.cosine_similarity(R_K.flatten(1), c_a.flatten(1))
                        word = s["words"][int(sim.argmax())]  # the candidate nearest c_a
                    else:
                        y_draw = gumbel(pi, d.g).detach()
                        c_a = einsum(y_draw, R_K, "k, k l d -> l d")[None]
                        word = s["words"][int(y_draw.argmax())]
                else:
                    c_a, word = c_fixed, args.preserve
                z_T = d.z_T.to(device, unet.dtype)
                t_encs.append(d.t_enc)
                if d.ca:  # CA: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, x0 an anchor image
                    z = ab.sqrt() * A[d.i, d.ca.j:d.ca.j + 1] + (1 - ab).sqrt() * d.ca.noise.to(device, A.dtype)
                elif args.method == "ca":  # CA: z_t on the frozen model's trajectory for the anchor
                    z = sample_z(m, sampler, z_T, c_anchor[d.i:d.i + 1], c_n, args, d.t_enc)
                else:
                    z = sample_z(m, sampler, z_T, c_e_i, c_n, args, d.t_enc)
                if c_a is not None:  # z_r: the same z_T, guided by c_a (AGE: c_t); --l2_on z: z itself
                    z_r = sample_z(m, sampler, z_T, c_a, c_n, args, d.t_enc) if args.l2_on == "z_r" else z

            if it < iterations - 1:
                # Algorithm 1: pi <- pi + eta grad_pi || eps_theta'(G(pi) R) - eps_theta(G(pi) R) ||^2,
                # at the draw's value, with the gradient of G at the current pi
                if args.search == "pgd":
                    c = c_a + pi - pi.detach()
                else:
                    y = gumbel(pi, d.g)
                    c = einsum(y_draw + y - y.detach(), R_K, "k, k l d -> l d")[None]
                e_prime = e(unet, z_r, t, c)
                if args.pi_grad == "both":
                    e_orig = e(unet_orig, z_r, t, c)
                else:
                    with torch.no_grad():
                        e_orig = e(unet_orig, z_r, t, c.detach())
                l2 = mse(space(e_prime, z_r, ab), space(e_orig, z_r, ab))
                scale = z_r.numel() if args.pi_optim == "sgd" else 1.0  # sgd: the printed sum
                (grad,) = torch.autograd.grad(l2 * scale, pi)
                if args.pi_optim == "normalized" and grad.norm() > 0:  # pgd as published: eta g / ||g|| ||c_a||
                    grad = grad / grad.norm() * pi.detach().norm()  # (at theta' = theta, g = 0: no step)
                pi.grad = -grad
                s["opt"].step()
                continue

            # Algorithm 2: theta' <- theta' - alpha grad [ L1 + lambda L2 ]
            with torch.no_grad():
                e_n = e(unet_orig, z, t, c_a if args.method == "age" else c_n)
                target = e_n  # Eq. 3: eps_theta(c_n) (AGE: eps_theta(c_t))
                if args.method == "ca":  # CA: the anchor's prediction (--ca_target trained: theta')
                    target = e(unet if args.ca_target == "trained" else unet_orig, z, t, c_anchor[d.i:d.i + 1])
                if args.negative_guidance:  # eps(c_n) - eta_neg (eps(c_e) - eps(c_n))
                    e_e = e(unet_orig, z, t, c_e_i)
                    target = e_n - args.negative_guidance * (e_e - e_n)
                if c_a is not None:
                    e_a = e(unet_orig, z_r, t, c_a)
            # Eq. 3 / L1 = || eps_theta'(z, c_e) - target ||^2
            l1 = mse(space(e(unet, z, t, c_e_i), z, ab), space(target, z, ab))
            l2 = torch.zeros((), device=device)
            if c_a is not None:  # Eq. 4/5, L2 = || eps_theta'(z_r, c_a) - eps_theta(z_r, c_a) ||^2
                l2 = mse(space(e(unet, z_r, t, c_a), z_r, ab), space(e_a, z_r, ab))
            if d.ca and d.ca.prior:  # CA's prior: || eps_theta'(x_t', c*) - eps' ||^2 on a second anchor image
                j_p, t_p, noise_p = d.ca.prior
                ab_p, noise_p = m.scheduler.alphas_cumprod[t_p].to(device), noise_p.to(device, A.dtype)
                z_p = ab_p.sqrt() * A[d.i, j_p:j_p + 1] + (1 - ab_p).sqrt() * noise_p
                l2 = mse(space(e(unet, z_p, t_p, c_anchor[d.i:d.i + 1]), z_p, ab_p), space(noise_p, z_p, ab_p))
            loss = l1 + args.lam * l2  # Eq. 4/5: L1 + lambda L2
            opt.zero_grad()
            loss.backward()
            opt.step()
        records.append(dict(step=k, loss=loss.item(), l1=l1.item(), l2=l2.item(), t=int(t), t_enc=d.t_enc,
                            c_e=args.concepts[d.i], c_a=word, t_encs=t_encs, seconds=round(time.perf_counter() - tic, 4)))
    return records, {n: p.detach() for n, p in unet.named_parameters() if n in names}


# ---------------------------------------------------------------------------- UnlearnDiffAtk
def simplex_bisection(a, xi=1e-12):
    """The published projection of a (V,) onto the simplex: bisection on mu until
    sum(clip(a - mu, 0, 1)) = 1, to within xi in mu."""
    lo, hi = (a - 1).min().item(), a.max().item()
    while hi - lo > xi:
        mu = (lo + hi) / 2
        if (a - mu).clamp(0, 1).sum().item() > 1:
            lo = mu
        else:
            hi = mu
    return (a - (lo + hi) / 2).clamp(0, 1)


def unlearndiffatk(m, prompt, seed, z0, gen, judge, s):
    """UnlearnDiffAtk for one prompt, as the published text_grad attacker runs it: the prompt's
    ids split into [SOT | prompt | k dropped | the rest] with the k adversarial embeddings put
    after SOT; at each timestep, iterations of: a one-hot token drawn from each row of p, its
    embedding, the erased model's MSE against fresh noise, the one-hot's gradient clipped to
    [-1, 1] as p's, Adam with L2 weight decay written out, and the bisection projection; then
    the argmax tokens are generated from and judged. z0: (1, C, H, W). Returns the result of
    the last timestep tried: its losses (every iteration), adv_ids, success."""
    ids = tokenize(m, [prompt])
    L, k = int((ids[0] == m.tokenizer.eos_token_id).nonzero()[0, 0]) - 1, s["k"]
    V = len(m.tokenizer)  # one vocabulary, whatever the number of text encoders
    p = torch.full((k, V), 1.0 / V, dtype=m.text_encoders[0].dtype)
    mom, var, n = torch.zeros_like(p), torch.zeros_like(p), 0
    b1, b2, adam_eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as the published code uses
    sot, mid, _, rest = ids.split([1, L, k, 76 - L - k], dim=1)
    adv_ids = torch.cat([sot, torch.zeros(1, k, dtype=ids.dtype), mid, rest], dim=1)
    abar = m.scheduler.alphas_cumprod
    T, nt = 1000, s["timesteps"]
    losses = []
    for t in list(range(T // nt // 2, T, T // nt))[:nt]:
        for _ in range(s["iterations"]):
            cdf = p.cumsum(-1)
            u = torch.rand(k, 1, generator=gen) * cdf[:, -1:]
            picks = [min(int((cdf[r] <= u[r]).sum()), V - 1) for r in range(k)]  # first index with cdf > u
            one_hot = torch.zeros(k, V, dtype=p.dtype)
            one_hot[range(k), picks] = 1
            one_hot.requires_grad_(True)

            def tokens(j, E, ids_j):  # encoder j's table E: [SOT | one_hot E | prompt | rest], (1, 77, D_j)
                return torch.cat([E[ids_j[0, :1]], one_hot @ E, E[ids_j[0, 1 + k:]]])[None]
            c = encode_ids(m, adv_ids, tokens)
            noise = torch.randn(z0.shape[1:], generator=gen)[None].to(z0.dtype)
            z_t = abar[t].sqrt() * z0 + (1 - abar[t]).sqrt() * noise
            loss = ((noise - eps(m, z_t, torch.tensor([t]), c)) ** 2).mean()
            g = torch.autograd.grad(loss, one_hot)[0].clamp(-1, 1) + s["weight_decay"] * p
            n += 1
            mom = b1 * mom + (1 - b1) * g
            var = b2 * var + (1 - b2) * g * g
            p = p - s["lr"] * (mom / (1 - b1 ** n)) / ((var / (1 - b2 ** n)).sqrt() + adam_eps)
            p = torch.stack([simplex_bisection(row) for row in p])
            losses.append(loss.item())
        adv_ids[0, 1:1 + k] = p.argmax(-1)
        with torch.no_grad():
            images, _ = sample_from(m, encode_ids(m, adv_ids), [seed], s["guidance"], s["steps"], empty(m))
        if judge(images)[0][0]:
            return dict(success=True, timestep=t, losses=losses, adv_ids=adv_ids[0].tolist())
    return dict(success=False, timestep=t, losses=losses, adv_ids=adv_ids[0].tolist())


def main(argv=None, m=None, unet_orig=None, resample=False):
    """`m` and `unet_orig`: two loaded copies of the model (tests pass float64 ones)."""
    args = erase.parse_args(argv)
    # two copies, each loaded from the checkpoint, as the published code does (a deep copy in
    # memory can differ from the original in the last bits: CPU kernels depend on alignment)
    m = m or load_model(args.model, args.device, vae=False)
    unet_orig = unet_orig or load_model(args.model, args.device, vae=False).unet
    records, theta_prime = erase_literally(m, unet_orig, args, resample)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items() if k not in ("resume", "save_every", "out")}, f, indent=1)
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    weights = os.path.join(args.out, "weights.safetensors")
    save_atomic({n: p.cpu().contiguous() for n, p in theta_prime.items()}, weights)
    return weights


if __name__ == "__main__":
    run_cli(main)
