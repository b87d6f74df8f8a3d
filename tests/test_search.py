"""Algorithm 1: vocabularies, candidates, Gumbel-Softmax and the ascent on L2."""
import argparse

import pytest
import torch

import search
from sample import UsageError, encode, load_model


def args(**kw):
    base = dict(search="gumbel", K=3, select="similar", k_closest=10, pi_optim="sgd", eta=0.5,
                tau=1.0, hard=True)
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
    for _ in range(30):
        search.ascend(s, lambda c: c.pow(2).mean(), a, g)
    assert search.chosen(s, a) == "b"


def test_a_search_step_increases_l2_on_the_tiny_unet(tiny_sd):
    m = load_model(tiny_sd)
    with torch.no_grad():  # theta' differs from theta, so that L2 is not zero
        theta = {n: p.clone() for n, p in m.unet.named_parameters() if "attn2" in n}
        for n, p in m.unet.named_parameters():
            if "attn2" in n:
                p.add_(0.05 * torch.randn_like(p))
    from erase import frozen
    eps_theta = frozen(m.unet, theta)
    z, t = torch.randn(1, 4, 8, 8), 501
    R = encode(m, ["truck", "car", "music", "tree", "red"])

    def l2_of(c):
        return (m.unet(z, t, encoder_hidden_states=c).sample - eps_theta(z, t, c)).pow(2).mean()

    a = args(hard=False, pi_optim="sgd", eta=50.0, K=5)
    s = dict(x=torch.zeros(5, requires_grad=True), R_K=R, words=list("abcde"))
    s["opt"] = torch.optim.SGD([s["x"]], lr=a.eta)
    before = float(l2_of(search.draw(s, a, torch.Generator().manual_seed(3))))
    search.ascend(s, l2_of, a, torch.Generator().manual_seed(3))  # same Gumbel noise
    after = float(l2_of(search.draw(s, a, torch.Generator().manual_seed(3))))
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
    clip = search.load_vocab("clip", m.tokenizer)
    assert 30000 < len(clip) < 40000 and all(w.isalpha() for w in clip) and "truck" in clip
    default = search.load_vocab("default", m.tokenizer)
    assert 2900 < len(default) <= 3000 and "truck" in default
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
