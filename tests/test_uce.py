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


# --uce_technique tensor (UCE's other erasing target, EAP's runs) and --uce_templates

def test_tensor_targets_by_hand():
    """One prompt of two rows: W C = [[1,0,1],[0,2,1]], ||W C||_F^2 = 7, W C* = [[1,2,2],[0,0,0]],
    <W C, W C*>_F = 3: target = W C* - (3/7) W C, projected over the whole 2 x 3 matrix at once."""
    W = torch.tensor([[1., 0.], [0., 2.], [1., 1.]], dtype=torch.float64)
    C = torch.tensor([[1., 0.], [0., 1.]], dtype=torch.float64)
    C_star = torch.tensor([[1., 1.], [0., 0.]], dtype=torch.float64)
    want = torch.tensor([[4 / 7, 2., 11 / 7], [0., -6 / 7, -3 / 7]], dtype=torch.float64)
    T = uce.tensor_targets(W, C, C_star)
    torch.testing.assert_close(T, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(uce.tensor_targets(W, C, C_star, [2]), want, atol=1e-12, rtol=0)
    assert abs((T * (C @ W.T)).sum()) < 1e-12  # orthogonal to u (to W C) over the whole matrix
    # two prompts: rows 0-1 as above, row 2 alone: W c = (1,2,2), W c* = (1,0,1), <.,.> = 3, ||.||^2 = 9
    C3 = torch.cat([C, torch.tensor([[1., 1.]], dtype=torch.float64)])
    S3 = torch.cat([C_star, torch.tensor([[1., 0.]], dtype=torch.float64)])
    row3 = torch.tensor([[1 - 3 / 9, -6 / 9, 1 - 6 / 9]], dtype=torch.float64)
    torch.testing.assert_close(uce.tensor_targets(W, C3, S3, [2, 1]), torch.cat([want, row3]), atol=1e-12, rtol=0)


def test_tensor_targets_match_the_formula_written_out():
    W, c, c_star = rand(7, 5, seed=0), rand(6, 5, seed=1), rand(6, 5, seed=2)
    sizes = [4, 2]
    T = uce.tensor_targets(W, c, c_star, sizes)
    start = 0
    for n in sizes:
        rows = range(start, start + n)
        Wc = [[sum(W[o, k] * c[i, k] for k in range(5)) for o in range(7)] for i in rows]
        Ws = [[sum(W[o, k] * c_star[i, k] for k in range(5)) for o in range(7)] for i in rows]
        norm = sum(x * x for r in Wc for x in r) ** 0.5
        dot = sum(a / norm * b for ra, rb in zip(Wc, Ws) for a, b in zip(ra, rb))  # <u, W C*>
        want = torch.tensor([[b - dot * a / norm for a, b in zip(ra, rb)] for ra, rb in zip(Wc, Ws)])
        torch.testing.assert_close(T[start:start + n], want.double(), atol=1e-10, rtol=0)
        assert abs((T[start:start + n] * (c[start:start + n] @ W.T)).sum()) < 1e-10  # orthogonal to u
        start += n


def test_tensor_edit_is_the_least_squares_solution_with_its_targets():
    d, lam, es, ps, sizes = 8, 0.3, 1.7, 0.6, [3, 2]
    c, c_star, c_pres = rand(5, d, seed=1), rand(5, d, seed=2), rand(20, d, seed=3)
    weights = {"k": rand(12, d, seed=4), "v": rand(7, d, seed=5)}
    out = uce.edit(weights, c, c_star, c_pres, lam, es, ps, technique="tensor", sizes=sizes)
    I = torch.eye(d, dtype=torch.float64)
    X = torch.cat([es ** 0.5 * c, ps ** 0.5 * c_pres, lam ** 0.5 * I])
    for name, W in weights.items():
        Y = torch.cat([es ** 0.5 * uce.tensor_targets(W, c, c_star, sizes), ps ** 0.5 * c_pres @ W.T, lam ** 0.5 * W.T])
        torch.testing.assert_close(out[name], torch.linalg.lstsq(X, Y).solution.T, atol=1e-10, rtol=1e-10)


def test_tensor_edit_leaves_nothing_along_the_old_direction():
    W, c, c_star = rand(12, 16, seed=0), rand(5, 16, seed=1), rand(5, 16, seed=2)
    W_new = uce.edit({"w": W}, c, c_star, lam=1e-8, technique="tensor", sizes=[1] * 5)["w"]
    old, new = c @ W.T, c @ W_new.T  # (5, 12): W c_i and W' c_i
    cos = (old * new).sum(1) / (old.norm(dim=1) * new.norm(dim=1))
    assert cos.abs().max() < 1e-6  # each prompt (one row here): W' c _|_ W c
    # W' c keeps the rest of W c*: W c* - <u, W c*> u
    u = old / old.norm(dim=1, keepdim=True)
    torch.testing.assert_close(new, c_star @ W.T - (u * (c_star @ W.T)).sum(1, keepdim=True) * u, atol=1e-5, rtol=0)
    replace = c @ uce.edit({"w": W}, c, c_star, lam=1e-8)["w"].T
    assert ((old * replace).sum(1) / (old.norm(dim=1) * replace.norm(dim=1))).abs().min() > 1e-3  # replace keeps some


def test_replace_is_the_closed_form_as_before():
    """The default path, op for op as uce.py computed it before --uce_technique: bit-identical."""
    d, lam, es, ps = 8, 0.3, 1.7, 0.6
    c, c_star, c_pres = rand(5, d, seed=1), rand(5, d, seed=2), rand(20, d, seed=3)
    weights = {"k": rand(12, d, seed=4).float(), "v": rand(7, d, seed=5)}
    I = torch.eye(d, dtype=torch.float64)
    P = c_pres.T @ c_pres
    B = es * c_star.T @ c + ps * P + lam * I
    A = es * c.T @ c + ps * P + lam * I
    M = torch.linalg.solve(A, B, left=False)
    for out in (uce.edit(weights, c, c_star, c_pres, lam, es, ps),
                uce.edit(weights, c, c_star, c_pres, lam, es, ps, technique="replace", sizes=[3, 2])):
        for name, W in weights.items():
            assert torch.equal(out[name], (W.double() @ M).to(W.dtype))


def test_erase_prompts_templates():
    obj = ["garbage truck", "image of garbage truck", "photo of garbage truck", "portrait of garbage truck",
           "picture of garbage truck", "painting of garbage truck"]
    assert uce.erase_prompts(["garbage truck"], [""], "object") == (obj, [""] * 6)
    art = ["Kelly McKernan", "painting by Kelly McKernan", "art by Kelly McKernan", "artwork by Kelly McKernan",
           "picture by Kelly McKernan", "style of Kelly McKernan"]
    assert uce.erase_prompts(["Kelly McKernan"], ["art"], "art") == (
        art, ["art"] * 6)  # the guide untemplated, as the published scripts map it
    assert uce.erase_prompts(["a", "b"], ["x", ""], "none") == (["a", "b"], ["x", ""])
    p, g = uce.erase_prompts(["a", "b"], ["x", ""], "object")
    assert p[:6] == ["a"] + [f"{t} of a" for t in ("image", "photo", "portrait", "picture", "painting")]
    assert g == ["x"] * 6 + [""] * 6


@pytest.mark.parametrize("templates", ["object", "art"])
def test_run_erases_the_concept_and_its_templated_prompts(m, templates):
    args = uce_args("--concept", "garbage truck", "--uce_templates", templates, "--uce_technique", "tensor")
    edited, info = uce.run(m, args)
    prompts = ["garbage truck"] + [t.format("garbage truck") for t in uce.TEMPLATES[templates]]
    assert info["erase_prompts"] == prompts and len(prompts) == 6
    sizes = [77 - uce.last_token(m, p) for p in prompts]  # guide "": its last token is 0
    assert info["erase_rows"] == sum(sizes)
    c, c_star, c_pres = uce.token_rows(m, prompts, [""] * 6, [""])
    weights = {n: p.detach() for n, p in m.unet.named_parameters() if n.endswith(uce.EDITED)}
    want = uce.edit(weights, c, c_star, c_pres, 0.5, 1.0, 1.0, technique="tensor", sizes=sizes)
    assert set(edited) == set(want) and all(torch.equal(edited[n], want[n]) for n in want)
    one_group = uce.edit(weights, c, c_star, c_pres, 0.5, 1.0, 1.0, technique="tensor")  # u over all 6 prompts
    assert not any(torch.allclose(one_group[n], want[n]) for n in want)


def test_run_default_is_replace_without_templates(m):
    default, info = uce.run(m, uce_args("--concept", "garbage truck, church"))
    assert info["erase_prompts"] == ["garbage truck", "church"]
    explicit, _ = uce.run(m, uce_args("--concept", "garbage truck, church", "--uce_technique", "replace",
                                      "--uce_templates", "none"))
    c, c_star, c_pres = uce.token_rows(m, ["garbage truck", "church"], ["", ""], [""])
    weights = {n: p.detach() for n, p in m.unet.named_parameters() if n.endswith(uce.EDITED)}
    want = uce.edit(weights, c, c_star, c_pres, 0.5, 1.0, 1.0)
    assert all(torch.equal(default[n], want[n]) and torch.equal(explicit[n], want[n]) for n in want)
    tensor, _ = uce.run(m, uce_args("--concept", "garbage truck, church", "--uce_technique", "tensor"))
    assert not any(torch.equal(tensor[n], want[n]) for n in want)


def test_eap_guide_space_is_the_empty_guide(m):
    """EAP's edit_model turns guide '' into ' ': the same ids, so --guide "" (the default) is it."""
    assert m.tokenizer(" ").input_ids == m.tokenizer("").input_ids
    a, b = uce.token_rows(m, ["garbage truck"], [" "]), uce.token_rows(m, ["garbage truck"], [""])
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))
