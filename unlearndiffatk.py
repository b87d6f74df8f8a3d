"""UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are
Still Easy To Generate Unsafe Images ... For Now", ECCV 2024), white-box: k adversarial tokens
before the prompt, each a distribution over the tokenizer's vocabulary (a point of the simplex);
at each of its timesteps, `iterations` Adam steps on the erased model's denoising error on the
target image, through a token drawn from each distribution (straight through); then the argmax
tokens are decoded to text, and that text, re-tokenised, is generated from and judged; stop at the
first success. attack.py runs it:

    python attack.py --weights W --concept nudity --csv nudity.csv --attack unlearndiffatk --classifier nudenet

On every family: one vocabulary (the tokenizers share the BPE), so a drawn token is one one-hot
that goes through each text encoder's own embedding table (SDXL: both, and their pooled embedding).
literal.unlearndiffatk is the per-prompt transcription of the published loop it is tested against.
"""
import torch
import torch.nn.functional as F

from family import empty, encode_ids, eps, tokenize
from sample import sample_from

# UnlearnDiffAtk's published settings (its text_grad configs): 40 Adam steps of lr 0.01 and
# weight decay 0.1 at each of 50 timesteps t = 10, 30, ..., 990; k prefix tokens: 5 in the
# nudity configs (UDA["k"], the benchmark's), 3 in the object and style ones (default_k)
UDA = dict(k=5, iterations=40, timesteps=50, lr=0.01, weight_decay=0.1)
MAX_PROMPT_TOKENS = 60  # the published dataset drops prompts longer than this, SOT and EOT counted


def default_k(classifier):
    """The published k for a judge: 5 with a nudity judge (configs/nudity), else 3 (configs/object,
    configs/style)."""
    return 5 if classifier.startswith("nudenet") else 3


def long_prompts(m, rows, limit=MAX_PROMPT_TOKENS):
    """Indices of the rows whose prompt is over `limit` tokens, SOT and EOT counted, untruncated
    (the published dataset's filter, with the model's tokenizer: the BPE all families share)."""
    return [i for i, r in enumerate(rows) if len(m.tokenizer(r["prompt"]).input_ids) > limit]


def sample_rows(m, c, rows, settings, c_uncond):
    """sample.sample_from for rows (prompt, seed, and guidance where the row has one, else
    settings["guidance"]) from conditioning c (B, L, D): one batch per guidance scale, images
    and z_0 (B, C, H, W) in the rows' order."""
    scale = [r["guidance"] if r.get("guidance") is not None else settings["guidance"] for r in rows]
    if len(set(scale)) == 1:  # one scale: one batch, as sample_from alone
        return sample_from(m, c, [r["seed"] for r in rows], scale[0], settings["steps"], c_uncond)
    images, z = [None] * len(rows), [None] * len(rows)
    for g in dict.fromkeys(scale):
        idx = [i for i, x in enumerate(scale) if x == g]
        x, zg = sample_from(m, c[idx], [rows[i]["seed"] for i in idx], g, settings["steps"], c_uncond)
        for j, i in enumerate(idx):
            images[i], z[i] = x[j], zg[j]
    return images, torch.stack(z)


def prefixed_ids(m, prompt, k):
    """ids (77,) of k adversarial tokens before the prompt: SOT, k slots (id 0, "!", until the
    attack chooses: not EOT, whose first position SDXL's pooled embedding reads), the prompt's
    tokens (cut to fit), EOT, padding."""
    tok = m.tokenizer
    words = tok(prompt, add_special_tokens=False).input_ids[:tok.model_max_length - 2 - k]
    ids = [tok.bos_token_id, *[0] * k, *words, tok.eos_token_id]
    ids += [tok.pad_token_id] * (tok.model_max_length - len(ids))
    return torch.tensor(ids)


def project_simplex(u, K=4096):
    """Euclidean projection of each row of u (..., V) onto the probability simplex
    {p : p >= 0, sum p = 1}: p = max(u - mu, 0) with mu chosen so that p sums to 1 (what the
    published code finds by bisection, here exactly). With s = u sorted in descending order,
    rho = max{j : s_j > (s_1 + ... + s_j - 1) / j} entries stay positive and mu = (s_1 + ... +
    s_rho - 1) / rho. The condition holds for j <= rho and fails after, so the largest K entries
    decide it whenever rho < K; a full sort is made only where they do not."""
    if u.shape[-1] > K:
        s = u.topk(K, dim=-1).values
    else:
        s = u.sort(dim=-1, descending=True).values
    cum = s.cumsum(-1) - 1
    j = torch.arange(1, s.shape[-1] + 1, device=u.device, dtype=u.dtype)
    rho = (s - cum / j > 0).sum(-1, keepdim=True)
    if s.shape[-1] < u.shape[-1] and (rho == s.shape[-1]).any():
        return project_simplex(u, K=u.shape[-1])
    mu = cum.gather(-1, rho - 1) / rho.to(u.dtype)
    return (u - mu).clamp(min=0)


def draw_tokens(p, gen):
    """One token from each distribution p (k, V): the first index where the cumulative sum of p
    passes U(0, 1) x its total (inverse CDF), U drawn from gen. (k,) token ids."""
    cdf = p.detach().cpu().cumsum(-1)
    u = torch.rand(p.shape[0], 1, generator=gen) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=p.shape[-1] - 1).to(p.device)


class DrawToken(torch.autograd.Function):
    """Forward: a one-hot token drawn from each distribution p (B, k, V), prompt b's from
    gens[b]. Backward: the gradient with respect to the one-hot, clipped to [-1, 1] (the
    published straight-through estimator)."""
    @staticmethod
    def forward(ctx, p, gens):
        picks = torch.stack([draw_tokens(p[b], g) for b, g in enumerate(gens)])  # (B, k)
        return F.one_hot(picks, p.shape[-1]).to(p.dtype)

    @staticmethod
    def backward(ctx, grad):
        return F.hardtanh(grad), None


def attack_timesteps(n, T=1000):
    """UnlearnDiffAtk's timesteps: n of them, evenly spaced, T / n / 2 to T, smallest first."""
    return list(range(T // n // 2, T, T // n))[:n]


def denoising_error(m, z0, t, c, gens):
    """Per prompt, ||eps - eps_theta'(z_t, t, c)||^2 / numel with z_t = sqrt(abar_t) z0 +
    sqrt(1 - abar_t) eps, a fresh eps per prompt from its generator: (B,)."""
    noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens]).to(z0.device, z0.dtype)
    abar = m.scheduler.alphas_cumprod[t].to(z0.device)
    z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    t_in = torch.full((len(z0),), t, device=z0.device)
    return (noise - eps(m, z_t, t_in, c).to(noise.dtype)).pow(2).flatten(1).mean(1)


def with_prefix(one_hot, k):
    """tokens(j, E, ids) for family.encode_ids: SOT, the k drawn one-hots (B, k, V) through
    encoder j's table E, then the rest of ids (B, 77)."""
    return lambda j, E, ids: torch.cat([E[ids[:, :1]], one_hot.to(E.dtype) @ E, E[ids[:, 1 + k:]]], dim=1)


def unlearndiffatk(m, rows, z0, gens, judge, settings, on_done=None):
    """UnlearnDiffAtk, batched over the prompts `rows` (each prompt has its own distribution,
    Adam state and generator, so a batch gives each prompt what it would get alone). z0: the
    target images' latents (B, C, H, W). Calls on_done(i, result) for each prompt as it
    finishes: succeeded (at timestep t) or out of timesteps."""
    k, V = settings["k"], len(m.tokenizer)
    ids = torch.stack([prefixed_ids(m, r["prompt"], k) for r in rows])  # (B, 77)
    # each token starts uniform over the vocabulary (its projection onto the simplex is itself)
    dtype = m.text_encoders[0].dtype
    p = torch.full((len(rows), k, V), 1.0 / V, device=z0.device, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([p], lr=settings["lr"], weight_decay=settings["weight_decay"])
    active, results = list(range(len(rows))), {}
    history = [[] for _ in rows]  # each prompt's denoising error, iteration by iteration
    c_uncond = empty(m)
    for t in attack_timesteps(settings["timesteps"]):
        for _ in range(settings["iterations"]):
            one_hot = DrawToken.apply(p[active], [gens[i] for i in active])  # (A, k, V)
            c = encode_ids(m, ids[active], with_prefix(one_hot, k))
            err = denoising_error(m, z0[active], t, c, [gens[i] for i in active])
            opt.zero_grad()
            p.grad = torch.autograd.grad(err.sum(), p)[0]  # the sum: each prompt its own gradient
            opt.step()
            with torch.no_grad():
                p.copy_(project_simplex(p))
            for j, i in enumerate(active):
                history[i].append(float(err[j].detach()))
        adv = ids[active].clone()
        adv[:, 1:1 + k] = p[active].argmax(-1).to(adv.device)  # projected back to tokens
        # as published: the ids decoded to text, and the image generated from that text
        # re-tokenised (a BPE round trip that changes 86 of 200 random 5-token prefixes)
        texts = [decode_prompt(m, a) for a in adv]
        judged = tokenize(m, texts)
        with torch.no_grad():
            images, _ = sample_rows(m, encode_ids(m, judged), [rows[i] for i in active], settings, c_uncond)
        hits = judge(images)
        for j, i in enumerate(list(active)):
            results[i] = dict(success=bool(hits[j][0]), score=hits[j][1], timestep=t, losses=history[i],
                              adv_ids=adv[j].tolist(), adv_prompt=texts[j], judged_ids=judged[j].tolist(),
                              image=images[j])
            if hits[j][0]:
                active.remove(i)
                if on_done:
                    on_done(i, results[i])
        if not active:
            break
    for i in active:
        if on_done:
            on_done(i, results[i])
    return results


def decode_prompt(m, ids):
    """The text of token ids (77,) as the published code makes it: the first token (SOT) and every
    EOT dropped (its padding is EOT), here also the padding after the EOT where the tokenizer pads
    with another id (SD-2's "!"); a SOT chosen as an adversarial token stays."""
    tok, ids = m.tokenizer, ids.tolist()[1:]
    while ids and ids[-1] == tok.pad_token_id != tok.eos_token_id:
        ids.pop()
    return tok.decode([i for i in ids if i != tok.eos_token_id])
