"""Algorithm 1 (Find Adversarial Concept): Gumbel-Softmax search over a concept space R.

Section 4 and Appendix B.1. For each erased concept c_e:
- R: a word list (`--vocab`), each word's embedding tau(word) computed once: the conditioning
  value of the prompt made of that word alone (family.encode: the text encoder's full (77, D)
  output; on SDXL both encoders' and the pooled embedding, (78, D)), cached on disk;
- the K candidates nearest to c_e (`--select similar`: the K most similar by cosine
  similarity, as the paper says; `--select kmeans`: the published code's two stages,
  the `--k_closest` nearest by L2 distance, then 1-D k-means on those distances, keeping
  the word nearest each of K centroids; `--select kmeans-sklearn`: the same with sklearn's
  KMeans as published, which may keep fewer than K);
- logits pi (K,), uniform at the start; c_a = G(pi) R with G the Gumbel-Softmax of
  temperature tau, hard (one-hot forward, straight-through gradient) or soft;
  `--gumbel_topk k` (AGE's published code, train_age.py's gumbel_softmax): soft G keeps its k
  largest weights, renormalised to sum 1, so pi's gradient reaches those k logits only; hard G
  ignores it (AGE's hard branch never reads k: its objects command's top-k 2 changes nothing);
- one draw of c_a per model update (`draw`): it conditions z_r and is the c_a of every L2 of
  that update; N_iter ascent steps pi <- pi + eta grad_pi L2 at the draw's value, the gradient
  taken at the current pi (`concept`, `ascend`; erase.py supplies L2).
`--search pgd` instead ascends a continuous c_a started at c_e (Fig. 4, top).

The vocabularies: a file (one concept per line); "default", the published R: the EAP
repository's `data/english_3000.csv` (column `word`), shipped as data/english_3000.txt, with the
published filter (a word is dropped when, lowercased, it holds a character outside a-z and
"</>": 2,994 of 3,000 stay, e.g. "e-mail" and "n't" go), words kept as written; "wordfreq",
the 3,000 most frequent English words from wordfreq, alphabetic only (2,937 words; this
project's default before the published list was shipped); "clip", Table 7's vocabulary as
published: every tokenizer entry that passes the same filter, embedded as its literal text
("apple</w>", which the tokenizer reads as "apple", "</", "w", ">"): 46,585 entries; "clip-words",
the whole lowercase a-z words among them with the end-of-word mark dropped (32,875);
"imagenet", AGE's object vocabulary: the 1,000 ImageNet class names that torchvision's
ResNet-50 weights carry (no download), as they are: case kept ("Cardigan" the corgi and
"cardigan" the sweater are two classes), all 1,000 distinct, "tench" first. AGE's code
(`--vocab Imagenet`) prompts with each class's whole WordNet string instead ("tench, Tinca
tinca": synonyms and Latin name; 999 distinct, "crane" twice); torchvision's names are in
essence the first synonym of each, as AGE's ConceptDict "imagenet" list (split(",")[0]) has them,
but with the two cranes and the two maillots told apart ("crane bird", "maillot tank suit").
In every vocabulary the erased concepts are dropped, compared without case, unless --keep_erased
(AGE's code keeps them).
"""
import hashlib
import os

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cli import UsageError
from family import encode


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def is_lower_word(w):
    """A word of `clip-words`: one or more lowercase letters a-z, nothing else."""
    return w.isascii() and w.isalpha() and w.islower()


def published_word(w):
    """The published code's filter (detect_special_tokens): lowercased, only a-z and '</>'."""
    return all(ch in "abcdefghijklmnopqrstuvwxyz</>" for ch in w.lower())


def load_vocab(spec, tokenizer, erased=(), keep_erased=False):
    """The concept space R as a list of words. R = C \\ E as printed: erased concepts are
    dropped (the published code keeps them; --keep_erased)."""
    if spec == "default":  # the published list, with the published filter: 2,994 words
        words = [w.rstrip("\n") for w in open(os.path.join(DATA, "english_3000.txt"), encoding="utf-8")]
        words = [w for w in words if w and published_word(w)]
    elif spec == "wordfreq":
        from wordfreq import top_n_list
        words = [w for w in top_n_list("en", 3000) if w.isalpha() and w.isascii()]
    elif spec == "imagenet":  # AGE's objects: ImageNet's 1,000 class names, as torchvision has them
        from torchvision.models import ResNet50_Weights
        words = list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    elif spec == "clip":  # as published: every entry passing the filter, as its literal text
        vocab = tokenizer.get_vocab()
        words = [t for t in sorted(vocab, key=vocab.get) if published_word(t)]  # in id order
    elif spec == "clip-words":  # whole words: lowercase a-z with the end-of-word mark (not 'A'..'Z')
        words = sorted(t[:-4] for t in tokenizer.get_vocab()
                       if t.endswith("</w>") and is_lower_word(t[:-4]))
    else:
        if not os.path.isfile(spec):
            raise UsageError(f"vocabulary file {spec} does not exist")
        words = [w.strip() for w in open(spec, encoding="utf-8")]
        words = list(dict.fromkeys(w for w in words if w))
        if not words:
            raise UsageError(f"vocabulary file {spec} is empty")
    if not keep_erased:
        drop = {e.lower() for e in erased}
        words = [w for w in words if w.lower() not in drop]
    return words


def embed_vocab(m, words, cache_dir, batch=256):
    """tau(word) for every word of R: (N, L, D), fp16 on the CPU. Computed once and cached
    as safetensors under a key made of the model, its text encoders' weights and R."""
    sums = [f"{float(e.get_input_embeddings().weight.float().sum()):.6e}" for e in m.text_encoders]
    key = hashlib.sha1("\n".join([str(m.name), *sums, *words]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"vocab-{key}.safetensors")
    if os.path.isfile(path):
        return load_file(path)["R"]
    if not words:
        raise UsageError("the concept space R is empty (every word was an erased concept)")
    R = None  # filled in place, batch by batch: R exists once (no list of chunks, no cat)
    for i in tqdm(range(0, len(words), batch), desc=f"embedding {len(words)} concepts"):
        c = encode(m, words[i:i + batch])
        if R is None:
            R = torch.empty((len(words), *c.shape[1:]), dtype=torch.float16)
        R[i:i + len(c)] = c
    os.makedirs(cache_dir, exist_ok=True)
    save_file({"R": R}, path + ".tmp")  # safetensors 0.8 writes from R's memory: no copy
    os.replace(path + ".tmp", path)  # atomic: a half-written cache is never read
    return R


def kmeans_1d(d, K, iters=50):
    """Cluster the values d (N,) into K groups; return the index of the value nearest each centroid."""
    mu = torch.quantile(d, torch.linspace(0, 1, K, dtype=d.dtype))
    for _ in range(iters):
        assign = (d[:, None] - mu[None]).abs().argmin(1)
        for j in range(K):
            if (assign == j).any():
                mu[j] = d[assign == j].mean()
    chosen = []
    for j in range(K):  # nearest still-unchosen value to each centroid: K distinct words
        order = (d - mu[j]).abs().argsort()
        chosen.append(next(int(i) for i in order if int(i) not in chosen))
    return torch.tensor(chosen)


CHUNK_BYTES = 4 * 2 ** 20  # float32 bytes of R scored at once by `candidates`


def row_chunks(n, row_bytes):
    """Slices covering rows 0..n-1, each about CHUNK_BYTES, their lengths equal up to one and
    at least 2 rows (a reduction over one row may sum in another order than over many)."""
    k = min(-(-n * row_bytes // CHUNK_BYTES), n // 2) or 1  # the number of chunks
    bounds = [i * n // k for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def scores(R, target, select):
    """Each concept of R (N, L, D) against target (1, L D), in float32 a chunk of rows at a
    time (Appendix B.1): cosine similarity for "similar", else L2 distance. Peak memory is a
    few chunks, not float32 copies of all of R (3.9 GB in fp16 for SD-1.4's CLIP words);
    the values are those computed over all of R at once."""
    out = torch.empty(len(R))
    for s in row_chunks(len(R), 4 * R.shape[1:].numel()):
        flat = rearrange(R[s].to(torch.float32, copy=True), "n l d -> n (l d)")
        out[s] = (F.cosine_similarity(flat, target) if select == "similar"
                  else flat.sub_(target).norm(dim=1))
    return out


def candidates(R, c_e, K, select="similar", k_closest=1000):
    """Indices of the K candidates in R for one erased concept c_e (L, D)."""
    if K > len(R):
        raise UsageError(f"K = {K} is larger than the vocabulary ({len(R)} concepts)")
    target = rearrange(c_e.float().cpu(), "l d -> 1 (l d)")
    if select == "similar":  # Appendix B.1: the K most similar concepts by cosine similarity
        return scores(R, target, select).topk(K).indices
    # published code: k_closest by L2 distance, then K representatives by 1-D k-means
    d = scores(R, target, select)
    if select == "kmeans":
        near = d.topk(min(max(k_closest, K), len(R)), largest=False).indices  # nearest first
        return near[kmeans_1d(d[near], K)]
    near = d.topk(min(k_closest, len(R)), largest=False).indices  # as published: k_closest < K keeps k_closest
    return near[sklearn_representatives(d[near], K)]


def sklearn_representatives(d, K):
    """--select kmeans-sklearn, the published code's (gen_embedding_matrix.py, my_kmean): sklearn's
    KMeans (random_state 0) on the values -d, then for each centroid the first value (nearest
    first) closest to it. Two centroids may pick the same word: the published dict keeps it once,
    so fewer than K candidates may come back, in the order of the centroids that first chose
    them. With k_closest <= K, all of them. n_init is fixed at 10, sklearn's default before 1.4
    (from 1.4: 1), so that the result does not depend on the installed version."""
    import numpy as np
    from sklearn.cluster import KMeans
    v = -d.double().numpy()
    if len(v) <= K:
        return torch.arange(len(v))
    centers = KMeans(n_clusters=K, random_state=0, n_init=10).fit(v[:, None]).cluster_centers_[:, 0]
    chosen = dict.fromkeys(int(np.abs(v - c).argmin()) for c in centers)  # argmin: the first of ties
    return torch.tensor(list(chosen))


def gumbel_noise(shape, generator):
    """g = -log(-log u), u ~ U(0, 1): the Gumbel noise of one draw of G(pi)."""
    u = torch.rand(shape, generator=generator).clamp(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(u))


def G(pi, g, tau, hard, topk=0):
    """Gumbel-Softmax with the noise g given: y = softmax((pi + g) / tau). Hard: the forward
    value is one_hot(argmax y), the gradient that of the soft y (straight-through); topk is
    ignored, as in AGE's code. Soft with topk = k > 0 (AGE's code): y's k largest weights,
    renormalised to sum 1, the others 0; its gradient is that of this renormalised y, i.e. of a
    softmax over the k kept logits alone: zero for the other K - k."""
    y = ((pi + g[:pi.shape[-1]].to(pi.device)) / tau).softmax(-1)  # K noises drawn; fewer candidates use the first
    if hard:
        y_hard = F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)
        return y_hard - y.detach() + y
    if topk:
        keep = y >= y.topk(min(topk, len(y))).values[-1]  # the k largest (a tie with the k-th kept too, as published)
        y = y * keep / (y * keep).sum(-1)  # AGE: y_i 1[i kept] / sum_j y_j 1[j kept], sums to 1
    return y


def gumbel_softmax(pi, tau, hard, generator, topk=0):
    """G(pi) with fresh Gumbel noise."""
    return G(pi, gumbel_noise(pi.shape, generator), tau, hard, topk)


def mix(y, R_K):
    """c_a = G(pi) R: the mixture of candidate embeddings, (K,) x (K, L, D) -> (1, L, D)."""
    return einsum(y, R_K, "k, k l d -> l d")[None]


def new_search(m, words, R, c_e, args, device):
    """Algorithm 1's state for each erased concept: its candidates and logits pi, with an
    optimiser (Adam, as the published code; `--pi_optim sgd` is the printed plain ascent;
    `normalized`, pgd's published step, moves by SGD with a rescaled gradient: `ascend`)."""
    states = []
    for i in range(len(c_e)):
        if args.search == "pgd":  # Fig. 4 (top): continuous c_a, initialised at c_e
            x = c_e[i:i + 1].detach().clone().requires_grad_(True)
            idx = candidates(R, c_e[i], min(args.K, len(R)), args.select, args.k_closest)
        else:
            idx = candidates(R, c_e[i], args.K, args.select, args.k_closest)  # K, or fewer (kmeans-sklearn)
            x = torch.zeros(len(idx), device=device, dtype=c_e.dtype, requires_grad=True)  # pi, uniform
        opt = (torch.optim.Adam if args.pi_optim == "adam" else torch.optim.SGD)([x], lr=args.eta)
        states.append(dict(x=x, opt=opt, words=[words[j] for j in idx],
                           R_K=R[idx].to(device, c_e.dtype)))  # R is cached in fp16
    return states


def draw(s, args, g):
    """This update's c_a: the value of G(pi; g) R at the update's start (g: its Gumbel noise,
    from erase.draws), or the continuous c_a (pgd). One draw per update: it conditions z_r
    and is the c_a of every L2 of the update, the N_iter ascent steps' and the model step's."""
    if args.search == "pgd":
        return dict(g=None, y=None, c_a=s["x"].detach().clone())
    y = G(s["x"], g, args.tau, args.hard, args.gumbel_topk).detach()
    return dict(g=g, y=y, c_a=mix(y, s["R_K"]))


def concept(s, d, args):
    """c_a of draw d, differentiable in pi: the draw's value, with the gradient of G(pi; g) at
    the current pi (straight-through around the draw). At the first ascent step pi has not
    moved, so this is G(pi; g) R itself; later steps keep the value z_r was sampled with."""
    if args.search == "pgd":
        x = s["x"]
        return d["c_a"] + x - x.detach()
    y = G(s["x"], d["g"], args.tau, args.hard, args.gumbel_topk)
    return mix(d["y"] + y - y.detach(), s["R_K"])


def ascend(s, l2_of, d, args, scale=1.0):
    """Algorithm 1, one step: pi <- pi + eta grad_pi L2(G(pi) R). Only pi moves: the gradient
    is taken with respect to pi alone, so nothing accumulates on the UNet's parameters.
    `scale` multiplies L2 (a mean over elements) back into the printed squared norm for
    plain ascent (--pi_optim sgd); Adam does not depend on it but for its epsilon.
    --pi_optim normalized (pgd, train_adversarial_pgd.py): c_a <- c_a + eta g / ||g|| ||c_a||, a
    step of eta times c_a's own norm along the gradient."""
    l2 = l2_of(concept(s, d, args))
    (grad,) = torch.autograd.grad(l2 * scale, s["x"])
    if args.pi_optim == "normalized":  # a zero gradient stays zero (no 0/0)
        grad = grad / grad.norm().clamp_min(torch.finfo(grad.dtype).tiny) * s["x"].detach().norm()
    s["x"].grad = -grad  # the optimiser descends; descending -L2 ascends L2
    s["opt"].step()
    return float(l2.detach())


def drawn(s, d, args):
    """The word logged for the update's c_a: the draw's largest weight (its one-hot for hard
    Gumbel-Softmax), or (pgd) the candidate nearest the continuous c_a by cosine."""
    if args.search == "pgd":
        sim = F.cosine_similarity(rearrange(s["R_K"], "k l d -> k (l d)"),
                                  rearrange(d["c_a"], "1 l d -> 1 (l d)"))
        return s["words"][int(sim.argmax())]
    return s["words"][int(d["y"].argmax())]


def chosen(s, args):
    """argmax pi: the concept the search currently favours (logged beside the draw)."""
    if args.search == "pgd":
        return None
    return s["words"][int(s["x"].argmax())]
