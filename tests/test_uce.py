"""uce.py: the closed form pinned on hand-made tensors (exact fit, preservation, the lambda limit,
and an independent least-squares solve of the objective), the published code's token rows on
the tiny model's real tokenizer, and run() end to end on the tiny random SD."""
import pytest
import torch
import torch.nn.functional as F

import erase
import uce
from cli import UsageError
from family import encode, load_model


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_tiny_lambda_maps_each_erased_row_to_its_guide_output():
    W, c, c_star = rand(12, 16, seed=0), rand(5, 16, seed=1), rand(5, 16, seed=2)  # n = 5 < d = 16
    W_new = uce.edit({"w": W.float()}, c.float(), c_star.float(), lam=1e-8, erase_scale=2.0)["w"]
    assert W_new.dtype == torch.float32  # computed in float64, returned in W's dtype
    W_new = uce.edit({"w": W}, c, c_star, lam=1e-8, erase_scale=2.0)["w"]
    # W' c_i = W c*_i
    torch.testing.assert_close(W_new @ c.T, W @ c_star.T, atol=1e-5, rtol=0)
    # the smallest change that does it: directions orthogonal to every c_i keep their outputs
    x = torch.linalg.qr(c.T, mode="complete").Q[:, 5:]  # (16, 11), orthogonal to span{c_i}
    torch.testing.assert_close(W_new @ x, W @ x, atol=1e-5, rtol=0)


def test_preserved_rows_keep_their_outputs():
    # 5 erased + 6 preserved rows in d = 8: both cannot be met, lam_p decides which wins
    W, c, c_star, c_pres = rand(12, 8, seed=0), rand(5, 8, seed=1), rand(5, 8, seed=2), rand(6, 8, seed=3)
    kept = uce.edit({"w": W}, c, c_star, c_pres, lam=1e-8, preserve_scale=1e6)["w"]
    torch.testing.assert_close(kept @ c_pres.T, W @ c_pres.T, atol=1e-4, rtol=0)
    free = uce.edit({"w": W}, c, c_star, None, lam=1e-8)["w"]
    assert (free @ c_pres.T - W @ c_pres.T).abs().max() > 0.1  # without preservation they move


def test_large_lambda_leaves_W_unchanged():
    W, c, c_star, c_pres = rand(12, 16, seed=0), rand(5, 16, seed=1), rand(5, 16, seed=2), rand(6, 16, seed=3)
    W_new = uce.edit({"w": W}, c, c_star, c_pres, lam=1e9)["w"]
    torch.testing.assert_close(W_new, W, atol=1e-6, rtol=0)


def test_edit_is_the_least_squares_solution():
    """min lam_e sum ||W' c_i - W c*_i||^2 + lam_p sum ||W' c_j - W c_j||^2 + lam ||W' - W||_F^2,
    solved as one stacked least-squares system X W'^T = Y: rows sqrt(weight) * input, targets
    sqrt(weight) * W input (the lam term: inputs e_k, targets W e_k)."""
    d, lam, es, ps = 8, 0.3, 1.7, 0.6
    c, c_star, c_pres = rand(5, d, seed=1), rand(5, d, seed=2), rand(20, d, seed=3)
    weights = {"k": rand(12, d, seed=4), "v": rand(7, d, seed=5)}
    out = uce.edit(weights, c, c_star, c_pres, lam=lam, erase_scale=es, preserve_scale=ps)
    I = torch.eye(d, dtype=torch.float64)
    X = torch.cat([es ** 0.5 * c, ps ** 0.5 * c_pres, lam ** 0.5 * I])
    inputs = torch.cat([es ** 0.5 * c_star, ps ** 0.5 * c_pres, lam ** 0.5 * I])  # what W is applied to
    for name, W in weights.items():
        W_lstsq = torch.linalg.lstsq(X, inputs @ W.T).solution.T
        torch.testing.assert_close(out[name], W_lstsq, atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def m(tiny_sd):
    return load_model(tiny_sd, vae=False)


def test_token_rows_take_the_tail_from_the_last_token(m):
    tok = m.tokenizer
    assert tok.tokenize("garbage truck") == ["garbage</w>", "truck</w>"]
    ids = tok("garbage truck").input_ids  # <|startoftext|> garbage truck <|endoftext|>
    L = ids.index(tok.convert_tokens_to_ids("truck</w>"))  # the last word's token
    assert L == 2 == uce.last_token(m, "garbage truck") and uce.last_token(m, "") == 0
    e, g, t, f = encode(m, ["garbage truck", "", "truck", "red fire truck"])
    c, c_star, c_pres = uce.token_rows(m, ["garbage truck", "truck"], ["", "red fire truck"], ["", "church"])
    # pair 1: concept from position 2, guide "" from 0, 77 - 2 = 75 rows each
    # pair 2: concept "truck" from 1, guide from 3 ("truck" in "red fire truck"), 77 - 3 = 74 rows
    assert len(c) == len(c_star) == 75 + 74
    torch.testing.assert_close(c, torch.cat([e[2:77], t[1:75]]), atol=0, rtol=0)
    torch.testing.assert_close(c_star, torch.cat([g[0:75], f[3:77]]), atol=0, rtol=0)
    torch.testing.assert_close(c_pres, torch.cat(list(encode(m, ["", "church"]))), atol=0, rtol=0)
    c1, s1, p1 = uce.token_rows(m, ["garbage truck", "truck"], ["", "red fire truck"], ["church"], last_only=True)
    torch.testing.assert_close(c1, torch.stack([e[2], t[1]]), atol=0, rtol=0)
    torch.testing.assert_close(s1, torch.stack([g[0], f[3]]), atol=0, rtol=0)
    torch.testing.assert_close(p1, encode(m, ["church"])[0, 1:2], atol=0, rtol=0)


def uce_args(*argv):
    return erase.parse_args(["--method", "uce", "--model", "unused", *argv])


def test_run_resolves_the_published_defaults(m):
    args = uce_args("--concept", "garbage truck", "--preserve", "church, tree")
    _, info = uce.run(m, args)
    assert (args.uce_lambda, args.erase_scale, args.preserve_scale) == (0.5, 1.0, 1 / 3)  # "" is preserved too
    assert info["erase_rows"] == 75 and info["preserve_rows"] == 3 * 77 and info["edited"] == 8
    args = uce_args("--concept", "garbage truck")
    uce.run(m, args)
    assert args.preserve_scale == 1.0  # max(0.1, 1 / 1): only "" preserved
    args = uce_args("--concept", "garbage truck", "--uce_lambda", "2", "--preserve_scale", "0.3")
    uce.run(m, args)
    assert (args.uce_lambda, args.preserve_scale) == (2.0, 0.3)  # given values are kept
    args = uce_args("--concept", "garbage truck", "--preserve", "car, bus, tree, road, church, red, music, "
                    "lexus, waste, dog")
    uce.run(m, args)
    assert args.preserve_scale == 0.1  # max(0.1, 1 / 11)


@pytest.mark.parametrize("argv", [["--concept", "a, b, c", "--guide", "x, y"],
                                  ["--concept", "truck", "--preserve", "Truck"],
                                  ["--concept", "truck", "--uce_lambda", "-1"]])
def test_run_refuses_bad_input(m, argv):
    with pytest.raises(UsageError):
        uce.run(m, uce_args(*argv))


def test_run_edits_attn2_keys_and_values_only_and_maps_concept_to_guide(tiny_sd):
    m = load_model(tiny_sd, vae=False)  # its own copy: the edited weights are loaded into it below
    before = {n: p.detach().clone() for n, p in m.unet.named_parameters()}
    # 60 tokens: 77 - 60 = 17 rows < d = 32, so lam -> 0 (and lam_p = 0) can fit them exactly
    concept = " ".join(["a photo of a red truck"] * 10)
    args = uce_args("--concept", concept, "--guide", "church", "--uce_lambda", "1e-9", "--preserve_scale", "0")
    edited, info = uce.run(m, args)
    names = {n for n in before if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert set(edited) == names and len(names) == 8 and all(n.endswith(".weight") for n in names)
    for n, p in m.unet.named_parameters():
        assert torch.equal(p, before[n]), f"run() changed {n} in place"
    assert all(edited[n].data_ptr() != p.data_ptr() for n, p in m.unet.named_parameters() if n in edited)
    c, c_star, _ = uce.token_rows(m, [concept], ["church"])
    assert info["erase_rows"] == len(c) == 17
    m.unet.load_state_dict(edited, strict=False)
    for name, module in m.unet.named_modules():
        if name.endswith("attn2"):
            for proj in ("to_k", "to_v"):
                W = before[f"{name}.{proj}.weight"]
                # the edited layer on the concept's rows gives what the original gave on the guide's
                torch.testing.assert_close(getattr(module, proj)(c), F.linear(c_star, W), atol=1e-4, rtol=1e-4)
                assert not torch.allclose(F.linear(c, W), F.linear(c_star, W), atol=1e-2)
