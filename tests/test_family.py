"""family.py, the one place that knows the model families: SD-1.x, SD-2.x (epsilon and
v-prediction) and SDXL. Our sampler against diffusers' own pipelines on each tiny family, the
v -> epsilon conversion, SDXL's conditioning (both encoders, pooled, micro-conditioning), and
what is refused before a weight is read."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import family
import offline
import params
from cli import UsageError

KINDS = ["sd1", "sd2", "sd2-v", "sdxl"]


def pipeline(folder, kind):
    """diffusers' own pipeline for the folder, with DDIM as our sampler runs it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", KINDS)
def test_our_sampler_agrees_with_the_diffusers_pipeline(tiny_kind, kind):
    """Same seed, DDIM, guidance 7.5: the same latents and, decoded, the same images (to uint8
    rounding). SDXL's unconditional branch is zeros in both (force_zeros_for_empty_prompt)."""
    folder = tiny_kind(kind)
    m, pipe = family.load_model(folder), pipeline(folder, kind)
    assert (m.family, m.prediction) == {"sd1": ("sd1", "epsilon"), "sd2": ("sd2", "epsilon"),
                                        "sd2-v": ("sd2", "v_prediction"), "sdxl": ("sdxl", "epsilon")}[kind]
    prompts, seeds = ["a photo of a garbage truck", "church"], [0, 1]
    z_T = torch.cat([family.noise(m, 1, s, "cpu") for s in seeds])
    kw = dict(num_inference_steps=12, guidance_scale=7.5, latents=z_T)
    theirs = pipe(prompts, output_type="latent", **kw).images
    c = family.encode(m, prompts)
    ours, t = family.ddim(lambda z, t, c: family.eps(m, z, t, c), m.scheduler, z_T, c,
                          family.empty(m).expand_as(c), 7.5, 12)
    assert t == 0 and torch.allclose(ours, theirs, atol=2e-5), (ours - theirs).abs().max()
    import sample
    images = pipe(prompts, output_type="np", **kw).images
    mine = np.stack(sample.generate(m, prompts, seeds, 7.5, 12, progress=False))
    assert images.shape[1] == m.pixels and np.abs(images * 255 - mine).max() <= 0.5 + 1e-3


def test_v_prediction_becomes_epsilon_at_the_queried_timestep(tiny_kind):
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t with abar at the timestep the UNet was given,
    per sample when t is a vector; x0 from that eps is diffusers' sqrt(abar) z - sqrt(1 - abar) v."""
    m = family.load_model(tiny_kind("sd2-v"))
    z, c = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), family.encode(m, ["a", "b", "c"])
    t = torch.tensor([10, 500, 990])
    v = m.unet(z, t, encoder_hidden_states=c).sample  # what the UNet predicts
    a = m.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    e = family.eps(m, z, t, c)
    assert torch.allclose(e, a.sqrt() * v + (1 - a).sqrt() * z, atol=1e-6)
    assert not torch.allclose(e, v, atol=1e-3)  # the conversion did something
    x0 = (z - (1 - a).sqrt() * e) / a.sqrt()
    assert torch.allclose(x0, a.sqrt() * z - (1 - a).sqrt() * v, atol=1e-4)
    # an int t: the same as that timestep for every sample
    assert torch.allclose(family.eps(m, z[1:2], 500, c[1:2]), e[1:2], atol=1e-6)
    # the wrong timestep's abar gives another epsilon: the test sees a t mix-up
    a_wrong = m.scheduler.alphas_cumprod[t.flip(0)].view(-1, 1, 1, 1)
    assert not torch.allclose(e, a_wrong.sqrt() * v + (1 - a_wrong).sqrt() * z, atol=1e-3)
    eps_model = family.load_model(tiny_kind("sd2"))  # an epsilon model's output is passed through
    assert torch.equal(family.eps(eps_model, z, t, c), eps_model.unet(z, t, encoder_hidden_states=c).sample)


def test_sdxl_conditioning_is_what_its_pipeline_feeds_the_unet(tiny_kind):
    """Tokens: both encoders' penultimate states concatenated; row 77: the pooled projection;
    the UNet gets text_embeds = pooled and time_ids (H, W, 0, 0, H, W) at the native size."""
    folder = tiny_kind("sdxl")
    m, pipe = family.load_model(folder), pipeline(folder, "sdxl")
    prompts = ["a red car on a road", ""]
    c = family.encode(m, prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    P = m.text_encoders[1].config.projection_dim
    assert c.shape == (2, 78, 32 + 64) and torch.equal(c[:, :77], embeds) and torch.equal(c[:, 77, :P], pooled)
    assert torch.equal(c[:, 77, P:], torch.zeros(2, 96 - P))
    assert torch.equal(family.empty(m), torch.zeros(1, 78, 96)) and torch.allclose(family.empty(m, False), c[1:], atol=1e-6)
    seen = []
    m.unet.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["added_cond_kwargs"]), with_kwargs=True)
    family.eps(m, torch.zeros(2, 4, 8, 8), 10, c)
    assert torch.equal(seen[0]["text_embeds"], pooled)
    assert seen[0]["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2 and m.pixels == 16


def test_the_second_tokenizer_pads_with_bang(tiny_kind):
    """SD-2's and SDXL's second tokenizer: the same BPE, padded with "!" (id 0) after EOT."""
    m = family.load_model(tiny_kind("sdxl"))
    ids = family.tokenize(m, ["a red car"])
    second = m.tokenizers[1]("a red car", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, 4] == 49407 and second[0, 4] == 49407 and second[0, 5] == 0 and ids[0, 5] == 49407
    assert torch.equal(family.repad(ids, m.tokenizers[1]), second)


def edit_json(path, **changes):
    cfg = json.loads(open(path).read())
    cfg.update(changes)
    open(path, "w").write(json.dumps(cfg))


def without_weights(src, dst):
    """A copy of a folder with every weight file removed: loading one would fail with another
    message, so a refusal here happened before any weight was read."""
    shutil.copytree(src, dst)
    for root, _, files in os.walk(dst):
        for f in files:
            if f.endswith(".safetensors"):
                os.remove(os.path.join(root, f))
    return dst


def test_unsupported_families_are_refused_before_any_weight(tiny_kind, tmp_path):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                      "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    inpaint = without_weights(tiny_kind("sd1"), tmp_path / "inpaint")
    edit_json(inpaint / "unet" / "config.json", in_channels=9)
    refiner = without_weights(tiny_kind("sdxl"), tmp_path / "refiner")
    edit_json(refiner / "model_index.json", _class_name="StableDiffusionXLImg2ImgPipeline",
              requires_aesthetics_score=True, text_encoder=[None, None])
    for folder, message in [(flux, "FluxPipeline .*not supported"), (sd3, "StableDiffusion3Pipeline .*not supported"),
                            (inpaint, "9 input channels .*inpainting"), (refiner, "the SDXL refiner")]:
        with pytest.raises(UsageError, match=message):
            family.load_model(str(folder))


def test_weights_of_another_family_are_refused(tiny_kind, tmp_path):
    import erase
    w = erase.main(["--model", tiny_kind("sd1"), "--concept", "church", "--method", "esd", "--steps", "1",
                    "--ddim_steps", "2", "--device", "cpu", "--out", str(tmp_path / "sd1")])
    with pytest.raises(UsageError, match="made for an sd1 model; .* is sdxl"):
        params.load_weights(family.load_model(tiny_kind("sdxl")), w)
    from safetensors.torch import load_file, save_file
    save_file(load_file(w), str(tmp_path / "bare.safetensors"))  # no metadata: the shapes still tell
    with pytest.raises(UsageError, match="do not fit this UNet"):
        params.load_weights(family.load_model(tiny_kind("sdxl")), str(tmp_path / "bare.safetensors"))


def test_full_size_configs_have_the_published_parameter_counts():
    """SD-2.1 and SDXL-base as bench.py counts them: UNet parameters, and the cross-attention
    (attn2) modules and parameters that erasure trains or UCE edits."""
    from diffusers import UNet2DConditionModel
    for kind, total, xattn, modules in [("sd2-v", 865_910_724, 50_352_320, 16),
                                        ("sdxl", 2_567_463_684, 545_670_400, 70)]:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**offline.configs(kind, "full")["unet"])
        sizes = dict(unet.named_parameters())
        names = [n for n in sizes if "attn2" in n]
        assert sum(p.numel() for p in sizes.values()) == total
        assert sum(sizes[n].numel() for n in names) == xattn and len({n.split(".attn2")[0] for n in names}) == modules
    assert tuple(sizes["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape) == (640, 2048)


@pytest.mark.parametrize("kind,method", [("sd2-v", "eap"), ("sd2-v", "uce"), ("sdxl", "eap"), ("sdxl", "uce")])
def test_erased_weights_load_into_the_diffusers_pipeline(tiny_kind, vocab, tmp_path, kind, method):
    """erase.py's weights.safetensors into StableDiffusionPipeline / StableDiffusionXLPipeline:
    every tensor has a home, the images change, and our sampler with the weights still agrees
    with the pipeline with them. UCE on SDXL edits every attn2 key and value, 96 = 32 + 64 wide."""
    import erase
    from safetensors.torch import load_file
    folder = tiny_kind(kind)
    path = erase.main(["--model", folder, "--concept", "garbage truck", "--method", method, "--steps", "3",
                       "--lr", "1e-2", "--K", "4", "--vocab", vocab, "--ddim_steps", "3", "--device", "cpu",
                       "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    pipe, m = pipeline(folder, kind), family.load_model(folder)
    z_T = family.noise(m, 1, 0, "cpu")
    kw = dict(num_inference_steps=4, guidance_scale=7.5, latents=z_T, output_type="latent")
    before = pipe("garbage truck", **kw).images
    result = pipe.unet.load_state_dict(load_file(path), strict=False)
    assert result.unexpected_keys == []
    after = pipe("garbage truck", **kw).images
    assert (after - before).abs().max() > 1e-4
    params.load_weights(m, path)
    c = family.encode(m, ["garbage truck"])
    ours, _ = family.ddim(lambda z, t, c: family.eps(m, z, t, c), m.scheduler, z_T, c, family.empty(m), 7.5, 4)
    assert torch.allclose(ours, after, atol=2e-5)
    if method == "uce":
        edited = load_file(path)
        assert set(edited) == {n for n, _ in m.unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
        assert {w.shape[1] for w in edited.values()} == {m.unet.config.cross_attention_dim}
