"""sample.py: agreement with diffusers' StableDiffusionPipeline, the grid, prompt files."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import family
import params
import sample
from cli import UsageError


def unet_eps(m):
    return lambda z, t, c: family.eps(m, z, t, c)


def test_ddim_agrees_with_stable_diffusion_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline
    m = family.load_model(tiny_sd)
    prompts, seeds = ["a photo of a garbage truck", "church"], [0, 1]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    z_T = torch.cat([family.noise(m, 1, s, "cpu") for s in seeds])
    kw = dict(num_inference_steps=20, guidance_scale=7.5, latents=z_T)
    theirs = pipe(prompts, output_type="latent", **kw).images
    ours, t = family.ddim(unet_eps(m), m.scheduler, z_T, family.encode(m, prompts),
                          family.encode(m, ["", ""]), 7.5, 20)
    assert t == 0 and torch.allclose(ours, theirs, atol=1e-6)
    images = pipe(prompts, output_type="np", **kw).images
    mine = np.stack(sample.generate(m, prompts, seeds, 7.5, 20, progress=False))
    assert np.abs(images * 255 - mine).max() <= 0.5 + 1e-3  # the same up to rounding to uint8


def test_stopping_at_step_t_returns_z_t_and_its_timestep(tiny_sd):
    m = family.load_model(tiny_sd)
    z_T, c = family.noise(m, 1, 0, "cpu"), family.encode(m, ["church"])
    z0, t0 = family.ddim(unet_eps(m), m.scheduler, z_T, c, family.encode(m, [""]), 3.0, 50, stop=0)
    assert torch.equal(z0, z_T) and t0 == 981  # SD-1.4's DDIM: 981, 961, ..., 1
    z7, t7 = family.ddim(unet_eps(m), m.scheduler, z_T, c, family.encode(m, [""]), 3.0, 50, stop=7)
    assert t7 == 981 - 7 * 20 and not torch.equal(z7, z_T)


def test_a_rows_sample_is_the_jth_latent_of_one_batch_from_its_seed(tiny_sd):
    """The published generate-images.py draws a prompt's num_samples latents as one batch from
    its evaluation_seed: (seed, j) is that batch's j-th; (seed, 0) is the plain seed's z_T."""
    m = family.load_model(tiny_sd, vae=False)
    cfg = m.unet.config
    batch = torch.randn((5, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=torch.manual_seed(7))
    for j in range(5):
        assert torch.equal(sample.z_T(m, (7, j)), batch[j:j + 1])
    assert torch.equal(sample.z_T(m, (7, 0)), sample.z_T(m, 7))
    assert sample.row_seed(dict(seed="7", sample="3")) == (7, 3) and sample.row_seed(dict(seed="7")) == 7


def test_grid_cli_original_beside_erased(tiny_sd, tmp_path):
    import erase
    weights = erase.main(["--model", tiny_sd, "--concept", "church", "--method", "esd",
                          "--steps", "2", "--lr", "1e-2", "--ddim_steps", "4", "--device", "cpu",
                          "--out", str(tmp_path / "erased")])
    out = tmp_path / "grid.png"
    sample.main(["--model", tiny_sd, "--prompts", "church, garbage truck", "--seeds", "0", "1", "2",
                 "--steps", "4", "--weights", weights, "--out", str(out), "--device", "cpu"])
    img = Image.open(out)
    assert img.height >= 2 * 16 and img.width > 2 * (160 + 3 * 16)
    assert sorted(os.listdir(tmp_path)) == ["erased", "grid.png"]


def test_bad_weights_are_refused(tiny_sd, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    from safetensors.torch import save_file
    save_file({"not.a.unet.param": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    m = family.load_model(tiny_sd)
    with pytest.raises(UsageError, match="do not fit"):
        params.load_weights(m, str(tmp_path / "w.safetensors"))
    with pytest.raises(UsageError, match="not a .safetensors"):
        sample.main(["--model", tiny_sd, "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "g.png")])


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_prompt_file_to_folder_is_resumable_and_sharded(tiny_sd, tmp_path, monkeypatch):
    rows = [dict(prompt=p, seed=s, guidance=g) for p, s, g in
            [("church", 0, 7.5), ("garbage truck", 1, 3.0), ("church", 2, ""), ("tench", 3, 7.5)]]
    write_csv(tmp_path / "p.csv", rows)
    argv = ["--model", tiny_sd, "--csv", str(tmp_path / "p.csv"), "--out_dir", str(tmp_path / "g"),
            "--steps", "3", "--device", "cpu"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sample.main(argv)  # rank 1 of 2: rows 1 and 3
    assert sorted(os.listdir(tmp_path / "g")) == ["00001.png", "00003.png", "settings.json"]
    monkeypatch.setenv("RANK", "0")
    sample.main(argv)
    files = sorted(os.listdir(tmp_path / "g"))
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png", "prompts.csv", "settings.json"]
    alone = sample.generate(family.load_model(tiny_sd), ["garbage truck"], [1], 3.0, 3, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g" / "00001.png")), alone[0])
    stamp = os.path.getmtime(tmp_path / "g" / "00000.png")
    monkeypatch.setenv("WORLD_SIZE", "1")
    sample.main(argv)  # all done: nothing is generated again
    assert os.path.getmtime(tmp_path / "g" / "00000.png") == stamp


def test_bad_prompt_files(tiny_sd, tmp_path):
    (tmp_path / "e.csv").write_text("prompt,seed\n")
    for bad, msg in [("e.csv", "no data rows"), ("missing.csv", "does not exist")]:
        with pytest.raises(UsageError, match=msg):
            sample.main(["--model", tiny_sd, "--csv", str(tmp_path / bad), "--out_dir", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()


def test_model_paths(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        family.load_model(str(tmp_path / "nothing"))
    with pytest.raises(UsageError, match="not a diffusers folder"):
        family.load_model(str(tmp_path))
    with pytest.raises(UsageError, match="could not load"):
        family.load_model("CompVis/stable-diffusion-v1-4")  # offline: a clear line, not a traceback


def test_fp16_checkpoint_loads_as_float32(tmp_path):
    import offline
    parts = offline.build(offline.configs("sd1"))
    for name in ("text_encoder", "unet", "vae"):
        parts[name].half()
    folder = offline.save_pipeline(str(tmp_path / "fp16"), parts)
    m = family.load_model(folder)
    dtypes = {p.dtype for net in (*m.text_encoders, m.unet, m.vae) for p in net.parameters()}
    assert dtypes == {torch.float32}
    (x,) = sample.generate(m, ["church"], [0], 7.5, 2, progress=False)  # no dtype mismatch
    assert x.dtype == np.uint8


def test_vae_false_skips_the_vae(tiny_sd, monkeypatch):
    import diffusers
    loaded = []
    real = diffusers.AutoencoderKL.from_pretrained
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained",
                        lambda *a, **kw: loaded.append(a) or real(*a, **kw))
    m = family.load_model(tiny_sd, vae=False)
    assert m.vae is None and loaded == [] and m.unet is not None and m.text_encoders
    assert family.load_model(tiny_sd).vae is not None and len(loaded) == 1


def images(model, precision, prompts, seeds, steps):
    m = family.load_model(model)
    sample.set_precision(m, precision)
    return np.stack(sample.generate(m, prompts, seeds, 7.5, steps, progress=False)).astype(float)


def test_reduced_precision_images_agree_with_fp32():
    """The toy model (trained; pixel space): bf16 images differ from fp32 ones by 0.92/255 on
    average (measured), and the oracle reads every one as the same concept as its fp32 twin."""
    import oracle
    prompts, seeds = ["a red circle", "a blue square", "a green star", "a purple heart"] * 4, range(16)
    ref, low = (images("toy", p, prompts, list(seeds), 20) for p in ("fp32", "bf16"))
    assert np.abs(low - ref).mean() <= 1.5
    judge = oracle.load_oracle()
    read = [oracle.recognise(judge, list(x.astype(np.uint8))) for x in (ref, low)]
    assert (read[0] == read[1]).all()


def test_fp16_through_the_vae_agrees_with_fp32(tiny_sd):
    """UNet and VAE in fp16 (CUDA's default): 0.07/255 on average on the tiny model (measured;
    bf16 0.56). On the CPU fp16 is slow: 4 images, 10 steps."""
    args = (["church", "a photo of a garbage truck"] * 2, [0, 1, 2, 3], 10)
    ref, low = images(tiny_sd, "fp32", *args), images(tiny_sd, "fp16", *args)
    assert np.abs(low - ref).mean() <= 0.25 and np.abs(low - ref).max() <= 4


def test_the_text_encoder_runs_once_per_batch_on_its_distinct_prompts(tiny_sd):
    m = family.load_model(tiny_sd)
    seen = []
    m.text_encoders[0].register_forward_hook(lambda mod, args, out: seen.append(len(args[0])))
    c_uncond = family.encode(m, [""])
    seen.clear()
    prompts = ["church", "truck", "church", "church", "truck", "road"]
    imgs = sample.generate(m, prompts, [0] * 6, 7.5, 2, batch=4, progress=False, c_uncond=c_uncond)
    assert seen == [2, 2]  # {church, truck}, then {truck, road}
    assert np.array_equal(imgs[0], imgs[2]) and not np.array_equal(imgs[0], imgs[1])


# ---------------------------------------------------------------- --scheduler ddim | ddim-ldm | lms
def lms_pipeline(folder, kind, prediction):
    """diffusers' pipeline with the LMS scheduler as EAP's eval-scripts/generate-images.py built
    it (its betas, the class's defaults otherwise), for the family's prediction type."""
    from diffusers import LMSDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          num_train_timesteps=1000, prediction_type=prediction)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd1", "sd2-v"])
def test_lms_agrees_with_the_pipeline_and_eaps_lms_scheduler(tiny_kind, kind):
    """Same seed, guidance 7.5, LMS: the same latents and, decoded, the same images (to uint8
    rounding); SD-2 768-v: the UNet's v goes to the scheduler, which reads it with its sigma."""
    folder = tiny_kind(kind)
    m = family.load_model(folder)
    pipe = lms_pipeline(folder, kind, m.prediction)
    prompts, seeds = ["a photo of a garbage truck", "church"], [0, 1]
    z_T = torch.cat([family.noise(m, 1, s, "cpu") for s in seeds])
    kw = dict(num_inference_steps=8, guidance_scale=7.5, latents=z_T)
    theirs = pipe(prompts, output_type="latent", **kw).images
    c = family.encode(m, prompts)
    ours = sample.denoise(m, z_T, c, family.empty(m).expand_as(c), 7.5, 8, "lms")
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    ddim = sample.denoise(m, z_T, c, family.empty(m).expand_as(c), 7.5, 8)
    assert not torch.allclose(ddim, theirs, atol=1e-2)  # another sampler: the test can tell
    if kind == "sd1":
        images = pipe(prompts, output_type="np", **kw).images
        mine = np.stack(sample.generate(m, prompts, seeds, 7.5, 8, progress=False, scheduler="lms"))
        assert np.abs(images * 255 - mine).max() <= 0.5 + 1e-3


def test_each_scheduler_queries_the_unet_at_its_published_timesteps(tiny_sd, monkeypatch):
    """S = 100: ddim 991, 981, ..., 1 (100 queries); ddim-ldm, CompVis with t_start = -1, 981
    down to 1 (99); lms, EAP's scheduler, linspace 999 ... 0 (100); epsilon recorded, not run.
    Then the UNet itself, hooked: S = 10, ddim-ldm runs it 9 times, at 801, 701, ..., 1."""
    m = family.load_model(tiny_sd)
    c, c_u = family.encode(m, ["church"]), family.encode(m, [""])
    z_T = family.noise(m, 1, 0, "cpu")
    seen = []
    expected = {"ddim": list(range(991, 0, -10)), "ddim-ldm": list(range(981, 0, -10)),
                "lms": list(np.linspace(0, 999, 100)[::-1])}
    with monkeypatch.context() as patch:
        patch.setattr(sample, "eps", lambda m, z, t, c: seen.append(float(t)) or torch.zeros_like(z))
        patch.setattr(sample, "unet_output", lambda m, z, t, c: seen.append(float(t)) or torch.zeros_like(z))
        for scheduler, ts in expected.items():
            seen.clear()
            sample.denoise(m, z_T, c, c_u, 7.5, 100, scheduler)
            assert len(seen) == len(ts) and np.allclose(seen, ts, atol=1e-3), (scheduler, seen[:3], len(seen))
    assert len(expected["ddim-ldm"]) == 99 and expected["ddim-ldm"][0] == 981
    seen.clear()
    m.unet.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1])))
    sample.denoise(m, z_T, c, c_u, 7.5, 10, "ddim-ldm")
    assert seen == list(range(801, 0, -100))  # 9 forwards


def test_ddim_ldm_is_compvis_ddim_from_its_second_last_timestep(tiny_sd):
    """The CompVis recurrence written out (ldm's DDIMSampler, eta 0, t_start = -1): timesteps
    1, 1 + k, ..., 1 + (S - 1) k (k = 1000 // S) less the last; at step i, abar_t at its
    timestep and abar_prev at the one below (abar_0 at the first); z_T taken as z at the start."""
    m = family.load_model(tiny_sd)
    prompts = ["church", "a photo of a garbage truck"]
    c, c_u = family.encode(m, prompts), family.encode(m, ["", ""])
    z = z_T = torch.cat([family.noise(m, 1, s, "cpu") for s in (3, 4)])
    S = 10
    abar = m.scheduler.alphas_cumprod
    ts = np.arange(0, 1000, 1000 // S) + 1
    prev = [abar[0]] + [abar[t] for t in ts[:-1]]
    for i in reversed(range(len(ts) - 1)):  # t_start = -1: timesteps[:-1]
        e_u, e_c = family.eps(m, torch.cat([z, z]), int(ts[i]), torch.cat([c_u, c])).chunk(2)
        e = e_u + 7.5 * (e_c - e_u)
        x0 = (z - (1 - abar[ts[i]]).sqrt() * e) / abar[ts[i]].sqrt()
        z = prev[i].sqrt() * x0 + (1 - prev[i]).sqrt() * e
    ours = sample.denoise(m, z_T, c, c_u, 7.5, S, "ddim-ldm")
    assert torch.allclose(ours, z, atol=1e-5), (ours - z).abs().max()
    assert not torch.allclose(sample.denoise(m, z_T, c, c_u, 7.5, S), z, atol=1e-3)


def test_ddim_stays_the_default_bit_for_bit(tiny_sd):
    """--scheduler ddim is family.ddim as before; the default of generate, sample_from and the CLI."""
    m = family.load_model(tiny_sd)
    prompts, seeds = ["church", "a photo of a garbage truck"], [5, 6]
    c = family.encode(m, prompts)
    z_T = torch.cat([family.noise(m, 1, s, "cpu") for s in seeds])
    before, _ = family.ddim(unet_eps(m), m.scheduler, z_T, c, family.empty(m).expand_as(c), 7.5, 6)
    assert torch.equal(sample.sample_from(m, c, seeds, 7.5, 6, family.empty(m))[1], before)
    assert torch.equal(sample.sample_from(m, c, seeds, 7.5, 6, family.empty(m), "ddim")[1], before)
    default = sample.generate(m, prompts, seeds, 7.5, 6, progress=False)
    assert all(np.array_equal(a, b) for a, b in
               zip(default, sample.generate(m, prompts, seeds, 7.5, 6, progress=False, scheduler="ddim")))
    assert sample.parse_args([]).scheduler == "ddim"
    with pytest.raises(UsageError, match="invalid choice"):
        sample.parse_args(["--scheduler", "euler"])


def test_prompt_file_with_each_scheduler_keeps_row_guidance_and_refuses_a_changed_resume(tiny_sd, tmp_path):
    rows = [dict(prompt="church", seed=0, guidance=3.0), dict(prompt="garbage truck", seed=1, guidance="")]
    write_csv(tmp_path / "p.csv", rows)
    m = family.load_model(tiny_sd)
    for scheduler in ("lms", "ddim-ldm"):
        out = tmp_path / scheduler
        argv = ["--model", tiny_sd, "--csv", str(tmp_path / "p.csv"), "--out_dir", str(out), "--steps", "4",
                "--device", "cpu", "--scheduler", scheduler]
        sample.main(argv)
        for row, g in zip(range(2), (3.0, 7.5)):
            alone = sample.generate(m, [rows[row]["prompt"]], [row], g, 4, progress=False, scheduler=scheduler)
            assert np.array_equal(np.asarray(Image.open(out / f"{row:05d}.png")), alone[0])
        with open(out / "settings.json") as f:
            assert json.load(f) == dict(model=os.path.abspath(tiny_sd), weights=None, scheduler=scheduler,
                                        steps=4, guidance=7.5)
        os.remove(out / "00001.png")
        other = "ddim" if scheduler == "lms" else "lms"
        with pytest.raises(UsageError, match=f"--scheduler {scheduler}.*--scheduler {other}"):
            sample.main(argv[:-1] + [other])
        with pytest.raises(UsageError, match="--steps 4.*--steps 5"):
            sample.main(argv[:-4] + ["--steps", "5", "--scheduler", scheduler])
        assert sorted(os.listdir(out)) == ["00000.png", "prompts.csv", "settings.json"]  # nothing written
        sample.main(argv)  # the same settings resume
        assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "prompts.csv", "settings.json"]
    legacy = tmp_path / "legacy"  # a folder from before settings.json: made by DDIM
    legacy.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(legacy / "00000.png")
    with pytest.raises(UsageError, match="before settings.json"):
        sample.main(["--model", tiny_sd, "--csv", str(tmp_path / "p.csv"), "--out_dir", str(legacy),
                     "--scheduler", "lms", "--device", "cpu"])
