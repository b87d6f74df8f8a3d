"""Algorithm 1: vocabularies, candidates, Gumbel-Softmax and the ascent on L2."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import search
from cli import UsageError
from family import encode, load_model


def args(**kw):
    base = dict(search="gumbel", K=3, select="similar", k_closest=10, pi_optim="sgd", eta=0.5,
                tau=1.0, hard=True, gumbel_topk=0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_hard_gumbel_softmax_is_one_hot_forward_with_soft_gradient():
    w = torch.tensor([1.0, 2.0, 3.0])
    pi = torch.tensor([0.1, 2.0, -1.0], requires_grad=True)
    y = search.gumbel_softmax(pi, 2.0, True, torch.Generator().manual_seed(0))
    assert sorted(y.tolist()) == [0.0, 0.0, 1.0]  # forward: one-hot
    (y * w).sum().backward()
    x = pi.detach().clone().requires_grad_(True)  # the soft sample with the same noise
    ys = search.gumbel_softmax(x, 2.0, False, torch.Generator().manual_seed(0))
    assert int(ys.argmax()) == int(y.argmax())
    (ys * w).sum().backward()
    assert pi.grad.abs().sum() > 0 and torch.allclose(pi.grad, x.grad)  # straight-through


def test_concept_keeps_the_draws_value_with_the_gradient_at_the_current_pi():
    """Every L2 of an update sees the value z_r was sampled with; pi's gradient is G's at the
    current pi, so at the first ascent step (pi unmoved) it is exactly G(pi; g) R."""
    R_K = torch.randn(4, 77, 2)
    for hard in (True, False):
        a = args(hard=hard, tau=1.5)
        s = dict(x=torch.tensor([0.3, -0.2, 0.1, 0.0], requires_grad=True), R_K=R_K, words=list("abcd"))
        g = search.gumbel_noise((4,), torch.Generator().manual_seed(5))
        d = search.draw(s, a, g)
        c = search.concept(s, d, a)
        ref = search.mix(search.G(s["x"], g, 1.5, hard), R_K)
        assert torch.allclose(c, ref) and torch.allclose(c, d["c_a"])
        w = torch.randn_like(c)
        gc, = torch.autograd.grad((c * w).sum(), s["x"])
        gr, = torch.autograd.grad((ref * w).sum(), s["x"])
        assert torch.allclose(gc, gr) and gc.abs().sum() > 0
        with torch.no_grad():
            s["x"].add_(torch.tensor([0.0, 0.5, 0.0, 0.0]))  # pi moves (a soft draw would change)
        assert torch.allclose(search.concept(s, d, a), d["c_a"])  # still the draw's value


def hand_made(tau=0.5):
    """pi and g with softmax((pi + g) / tau) = [1, 4, 2, 3] / 10 exactly (float64)."""
    pi = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    g = tau * torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=torch.float64).log() - pi.detach()
    return pi, g


def test_soft_top_k_keeps_the_k_largest_weights_renormalised():
    """AGE's soft top-k: y = [1, 4, 2, 3] / 10, k = 2 -> [0, 4, 0, 3] / 7; the gradient of
    w . G is that of a softmax over the two kept logits, (1 / tau) p_i (w_i - p . w), and 0
    for the others."""
    tau, w = 0.5, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    pi, g = hand_made(tau)
    y = search.G(pi, g, tau, hard=False, topk=2)
    assert torch.allclose(y, torch.tensor([0, 4 / 7, 0, 3 / 7], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.isclose(y.sum(), torch.tensor(1.0, dtype=torch.float64)) and int((y != 0).sum()) == 2
    (grad,) = torch.autograd.grad((w * y).sum(), pi)
    p_w = 4 / 7 * 2 + 3 / 7 * 4  # p . w over the kept two
    expect = torch.tensor([0, 4 / 7 * (2 - p_w), 0, 3 / 7 * (4 - p_w)], dtype=torch.float64) / tau
    assert torch.allclose(grad, expect, rtol=0, atol=1e-12)
    assert grad[[0, 2]].abs().max() < 1e-12  # nothing reaches the dropped logits (0 up to rounding)
    y3 = search.G(pi, g, tau, hard=False, topk=3)  # [0, 4, 2, 3] / 9
    assert torch.allclose(y3, torch.tensor([0, 4 / 9, 2 / 9, 3 / 9], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(search.G(pi, g, tau, False, 4), search.G(pi, g, tau, False, 0))  # k = K: all


def test_hard_gumbel_softmax_ignores_top_k_as_ages_code():
    """AGE's hard branch never reads k: one-hot forward, the full soft y's gradient (every logit)."""
    tau, w = 0.5, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    pi, g = hand_made(tau)
    y = search.G(pi, g, tau, hard=True, topk=2)
    assert y.tolist() == [0.0, 1.0, 0.0, 0.0]
    (grad,) = torch.autograd.grad((w * y).sum(), pi)
    p = torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=torch.float64) / 10  # straight-through: softmax's
    assert torch.allclose(grad, p * (w - (p * w).sum()) / tau, rtol=0, atol=1e-12)
    assert (grad != 0).all()


def test_draw_and_concept_use_top_k():
    """search.draw's value and search.concept's gradient are the top-k G's (soft)."""
    R_K = torch.randn(4, 77, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = args(hard=False, tau=0.5, gumbel_topk=2)
    pi, g = hand_made(0.5)
    s = dict(x=pi, R_K=R_K, words=list("abcd"))
    d = search.draw(s, a, g)
    assert torch.allclose(d["y"], torch.tensor([0, 4 / 7, 0, 3 / 7], dtype=torch.float64))
    assert torch.allclose(d["c_a"], (4 * R_K[1] + 3 * R_K[3])[None] / 7) and search.drawn(s, d, a) == "b"
    (grad,) = torch.autograd.grad(search.concept(s, d, a).sum(), pi)
    assert grad[[0, 2]].abs().max() < 1e-12 and grad[[1, 3]].abs().min() > 1e-3


def test_gumbel_topk_is_refused_outside_0_to_K():
    import erase
    base = ["--concept", "church", "--method", "age", "--K", "4", "--device", "cpu"]
    assert erase.parse_args(base + ["--gumbel_topk", "4"]).gumbel_topk == 4
    for bad in ("5", "-1"):
        with pytest.raises(UsageError, match="--gumbel_topk"):
            erase.parse_args(base + ["--gumbel_topk", bad])


def test_imagenet_vocabulary_is_torchvisions_class_names_as_they_are():
    words = search.load_vocab("imagenet", None, keep_erased=True)
    assert len(words) == 1000 == len(set(words)) and words[0] == "tench" and words[217] == "English springer"
    assert "Cardigan" in words and "cardigan" in words  # corgi and sweater: case is kept
    erased = ["Garbage Truck", "church"]
    kept = search.load_vocab("imagenet", None, erased)
    assert len(kept) == 998 and "garbage truck" not in kept and "church" not in kept
    assert kept[0] == "tench" and "English springer" in kept


def test_soft_gumbel_softmax_is_a_distribution_sharper_at_low_tau():
    pi = torch.tensor([0.0, 1.0, 0.0])
    hot = search.gumbel_softmax(pi, 0.05, False, torch.Generator().manual_seed(1))
    warm = search.gumbel_softmax(pi, 5.0, False, torch.Generator().manual_seed(1))
    assert torch.isclose(hot.sum(), torch.tensor(1.0)) and torch.isclose(warm.sum(), torch.tensor(1.0))
    assert hot.max() > warm.max()


def test_ascent_moves_pi_towards_the_concept_with_the_largest_l2():
    R_K = torch.stack([torch.full((77, 4), v) for v in (0.1, 1.0, 0.3)])  # L2 grows with |c|
    s = dict(x=torch.zeros(3, requires_grad=True), R_K=R_K, words=["a", "b", "c"])
    a = args(pi_optim="adam", eta=0.1, hard=False)
    s["opt"] = torch.optim.Adam([s["x"]], lr=a.eta)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):  # one draw per update, then its ascent step
        d = search.draw(s, a, search.gumbel_noise((3,), g))
        search.ascend(s, lambda c: c.pow(2).mean(), d, a)
    assert search.chosen(s, a) == "b"


def test_pgd_published_step_is_eta_times_the_norm_of_c_a_along_the_gradient():
    """--pi_optim normalized (train_adversarial_pgd.py): c_a <- c_a + eta g / ||g|| ||c_a||, so
    the step's length is eta ||c_a|| whatever the size of g, and it goes up the gradient."""
    c0 = torch.randn(1, 77, 4)
    w = torch.randn(1, 77, 4)
    a = args(search="pgd", pi_optim="normalized", eta=0.05)
    for size in (1e-6, 1e3):  # the gradient's size does not matter
        s = dict(x=c0.clone().requires_grad_(True), R_K=torch.randn(3, 77, 4), words=list("abc"))
        s["opt"] = torch.optim.SGD([s["x"]], lr=a.eta)
        search.ascend(s, lambda c: size * (c * w).sum(), search.draw(s, a, None), a)
        step = s["x"].detach() - c0
        assert torch.isclose(step.norm(), a.eta * c0.norm(), rtol=1e-5)
        assert torch.allclose(step / step.norm(), w / w.norm(), atol=1e-6)  # up the gradient of L2


def test_pgd_published_step_is_refused_for_the_gumbel_search(tiny_sd, tmp_path):
    import erase
    with pytest.raises(UsageError, match="--search pgd only"):
        erase.parse_args(["--concept", "truck", "--pi_optim", "normalized"])


def test_a_search_step_increases_l2_on_the_tiny_unet(tiny_sd):
    m = load_model(tiny_sd)
    with torch.no_grad():  # theta' differs from theta, so that L2 is not zero
        theta = {n: p.clone() for n, p in m.unet.named_parameters() if "attn2" in n}
        for n, p in m.unet.named_parameters():
            if "attn2" in n:
                p.add_(0.05 * torch.randn_like(p))
    from params import frozen
    eps_theta = frozen(m, theta)
    z, t = torch.randn(1, 4, 8, 8), 501
    R = encode(m, ["truck", "car", "music", "tree", "red"])

    def l2_of(c):
        return (m.unet(z, t, encoder_hidden_states=c).sample - eps_theta(z, t, c)).pow(2).mean()

    a = args(hard=False, pi_optim="sgd", eta=50.0, K=5)
    s = dict(x=torch.zeros(5, requires_grad=True), R_K=R, words=list("abcde"))
    s["opt"] = torch.optim.SGD([s["x"]], lr=a.eta)
    g = search.gumbel_noise((5,), torch.Generator().manual_seed(3))  # the same noise throughout
    before = float(l2_of(search.draw(s, a, g)["c_a"]))
    search.ascend(s, l2_of, search.draw(s, a, g), a)
    after = float(l2_of(search.draw(s, a, g)["c_a"]))
    assert after > before


def test_candidates_similar_and_kmeans():
    R = torch.randn(20, 77, 4)
    c_e = R[7] + 0.01 * torch.randn(77, 4)
    idx = search.candidates(R, c_e, 3, "similar")
    assert int(idx[0]) == 7 and len(set(idx.tolist())) == 3
    idx = search.candidates(R, c_e, 5, "kmeans", k_closest=12)
    assert len(set(idx.tolist())) == 5 and 7 in idx.tolist()  # nearest value is its own centroid's
    with pytest.raises(UsageError, match="larger than the vocabulary"):
        search.candidates(R, c_e, 21)


def test_sklearn_kmeans_collapses_shared_representatives_as_published():
    """--select kmeans-sklearn: sklearn's KMeans on the distances; a word that is nearest to two
    centroids is kept once (fewer than K come back), the first of equal values wins, and
    k_closest <= K keeps all k_closest, nearest first."""
    d = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 9.9, 10.0])
    assert sorted(d[search.sklearn_representatives(d, 3)].round().tolist()) == [0.0, 5.0, 10.0]
    same = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0])  # two distinct values, three centroids
    assert sorted(search.sklearn_representatives(same, 3).tolist()) == [0, 4]
    R = torch.randn(20, 77, 4)
    c_e = R[7] + 0.01 * torch.randn(77, 4)
    idx = search.candidates(R, c_e, 5, "kmeans-sklearn", k_closest=3)
    assert len(idx) == 3 and int(idx[0]) == 7


def test_kmeans_1d_picks_one_value_per_cluster():
    d = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 9.9, 10.0])
    chosen = search.kmeans_1d(d, 3)
    assert sorted(d[chosen].round().tolist()) == [0.0, 5.0, 10.0]


def test_vocabularies(tmp_path, tiny_sd):
    m = load_model(tiny_sd)
    f = tmp_path / "v.txt"
    f.write_text("truck\n\ncar\ngarbage truck\ncar\n")
    assert search.load_vocab(str(f), m.tokenizer, ["garbage truck"]) == ["truck", "car"]
    assert search.load_vocab(str(f), m.tokenizer, ["garbage truck"], keep_erased=True)[-1] == "garbage truck"
    default = search.load_vocab("default", m.tokenizer)  # the published list, published filter
    assert len(default) == 2994 and "truck" in default and "African" in default  # as written
    assert not {"e-mail", "n't", "long-term"} & set(default)
    assert len(search.load_vocab("default", m.tokenizer, ["Truck"])) == 2993  # E dropped, any case
    wordfreq = search.load_vocab("wordfreq", m.tokenizer)
    assert len(wordfreq) == 2937 and all(w.isalpha() for w in wordfreq)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UsageError, match="empty"):
        search.load_vocab(str(tmp_path / "empty.txt"), m.tokenizer)
    with pytest.raises(UsageError, match="does not exist"):
        search.load_vocab(str(tmp_path / "missing.txt"), m.tokenizer)


def test_embeddings_are_computed_once_and_cached(tmp_path, tiny_sd, monkeypatch):
    m = load_model(tiny_sd)
    R = search.embed_vocab(m, ["truck", "car"], str(tmp_path))
    assert R.shape == (2, 77, 32) and R.dtype == torch.float16
    assert torch.allclose(R.float(), encode(m, ["truck", "car"]), atol=1e-2)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    calls = []
    monkeypatch.setattr(search, "encode", lambda *a: calls.append(a))
    assert torch.equal(search.embed_vocab(m, ["truck", "car"], str(tmp_path)), R)
    assert calls == []  # read from the cache, not encoded again


def test_clip_vocabularies(tiny_sd):
    """Table 7's CLIP vocabulary as published: every entry passing the published filter, as its
    literal text (46,585, 32,915 of them with the end-of-word mark); clip-words: whole words."""
    m = load_model(tiny_sd)
    clip = search.load_vocab("clip", m.tokenizer)
    assert len(clip) == 46585 == len(set(clip)) and sum(w.endswith("</w>") for w in clip) == 32915
    assert clip[:4] == ["/", "<", ">", "A"] and "apple</w>" in clip  # id order, the filter lowercases
    assert m.tokenizer("apple</w>").input_ids[1:-1] != m.tokenizer("apple").input_ids[1:-1]  # literal
    words = search.load_vocab("clip-words", m.tokenizer)
    assert not any(c.isupper() for w in words for c in w)  # not the byte symbols 'A'..'Z'
    assert all(w.isascii() and w.isalpha() for w in words) and len(words) == 32875 == len(set(words))
    assert {w + "</w>" for w in words} <= set(clip)


def whole_at_once(R, c_e, K, select, k_closest):
    """candidates() as first written: float32 copies of all of R (the reference)."""
    flat = R.float().flatten(1)
    target = c_e.float().flatten()[None]
    if select == "similar":
        return torch.nn.functional.cosine_similarity(flat, target).topk(K).indices
    d = (flat - target).norm(dim=1)
    near = d.topk(min(max(k_closest, K), len(R)), largest=False).indices
    return near[search.kmeans_1d(d[near], K)]


@pytest.mark.parametrize("D", [8, 768])  # 768: SD-1.4, rows long enough to sum in parallel
@pytest.mark.parametrize("rows", [2, 7, 10 ** 6])  # rows per chunk (10 ** 6: all at once)
def test_chunked_candidates_equal_the_whole_at_once(D, rows, monkeypatch):
    monkeypatch.setattr(search, "CHUNK_BYTES", rows * 77 * D * 4)
    g = torch.Generator().manual_seed(D + rows)
    R = torch.randn(100, 77, D, generator=g).half()
    c_e = R[11].float() + 0.3 * torch.randn(77, D, generator=g)
    flat, target = R.float().flatten(1), c_e.flatten()[None]
    assert torch.equal(search.scores(R, target, "similar"),
                       torch.nn.functional.cosine_similarity(flat, target))  # bit for bit
    assert torch.equal(search.scores(R, target, "kmeans"), (flat - target).norm(dim=1))
    for select in ("similar", "kmeans"):
        ours = search.candidates(R, c_e, 20, select, k_closest=60)
        assert torch.equal(ours, whole_at_once(R, c_e, 20, select, 60)), select


def test_row_chunks_cover_all_rows_in_near_equal_parts():
    for n in (1, 2, 3, 10, 300, 32875):  # lengths equal up to one, 2 rows or more
        lengths = [s.stop - s.start for s in search.row_chunks(n, 77 * 768 * 4)]
        assert sum(lengths) == n and max(lengths) - min(lengths) <= 1 and min(lengths) >= min(n, 2)
    assert len(search.row_chunks(32875, 77 * 768 * 4)) == 1855  # SD-1.4: 17 or 18 rows, 4 MiB


PEAK = r"""
import gc, json, sys
import torch
import search
from family import encode, load_model


def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))


def reset_peak():
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return status("VmRSS:")


model, cache, phase, encoder = sys.argv[1:5]
m = load_model(model)
words = search.load_vocab("clip-words", m.tokenizer)
g, D = torch.Generator().manual_seed(0), m.text_encoders[0].config.hidden_size
if encoder == "stub":  # the text encoder's output shape, without its time and working memory
    search.encode = lambda m, ws: torch.randn(len(ws), 77, D, generator=g)
if phase == "embed":  # the first run: encode every word and write the cache
    base = reset_peak()
    R = search.embed_vocab(m, words, cache)
    out = dict(extra=status("VmHWM:") - base - R.nbytes)
else:  # later runs: R read from the cache, then the candidates of one erased concept
    R = search.embed_vocab(m, words, cache)
    R.sum()  # load_file maps the file: bring R in once, before the baseline
    c_e = R[words.index("church")].float() + 0.1 * torch.randn(R.shape[1:], generator=g)
    base = reset_peak()
    idx = {s: search.candidates(R, c_e, 100, s, 1000).tolist() for s in ("similar", "kmeans")}
    out = dict(extra=status("VmHWM:") - base, idx=idx)
print(json.dumps(dict(out, phase=phase, words=len(words), R_bytes=R.nbytes,
                      ratio=out["extra"] / R.nbytes)))
"""


def peak_extra(model, cache, phase, encoder="stub", root=None):
    """Peak host memory of embed_vocab ("embed": beyond R itself) or candidates ("candidates")
    for --vocab clip-words (32,875 words), measured in a fresh process (Linux: VmHWM after clear_refs), as a
    multiple of R's bytes. encoder "stub": random embeddings of the text encoder's shape
    (fast; its working memory left out), "real": the model's. `root`: the folder whose
    search.py is measured (this one by default)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-c", PEAK, model, cache, phase, encoder], cwd=root,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_clip_vocabulary_memory_is_r_once(tiny_sd, tmp_path):
    embed = peak_extra(tiny_sd, str(tmp_path), "embed")
    assert embed["R_bytes"] == embed["words"] * 77 * 32 * 2 > 160e6  # fp16 (N, 77, D)
    assert embed["ratio"] <= 0.5, embed["ratio"]  # was 1x to 2x: a list of chunks, then torch.cat
    cand = peak_extra(tiny_sd, str(tmp_path), "candidates")
    assert cand["ratio"] <= 0.5, cand["ratio"]  # was about 8x: float32 copies of all of R


if __name__ == "__main__":  # python -m tests.test_search MODEL [stub|real] [ROOT]: the figures
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for phase in ("embed", "candidates"):
            r = peak_extra(sys.argv[1], d, phase, *sys.argv[2:4])
            print(f"{phase}: {r['words']} words, R {r['R_bytes'] / 1e6:.0f} MB, peak extra "
                  f"{r['extra'] / 1e6:.1f} MB = {r['ratio']:.3f} x R")
