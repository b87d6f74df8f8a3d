"""Speed and memory of the erasure loop: ours (erase.py) against the published code's schedule.

Both run EAP model updates on a family's UNet and text-encoder architecture (--family: SD-1.4,
SD-2.1, SDXL-base) with random weights (offline.py; nothing is downloaded), on the same device,
in one run:
- ours: erase.main itself: one UNet, the frozen model by swapping the original values of the
  trained subset in, z and z_r sampled in one batched DDIM loop (bf16 on CUDA) and shared by
  the N_iter search steps and the model step, frozen forwards batched, trained ones batched;
- baseline: the published code's schedule, as literal.py transcribes it (resample=True): two
  full fp32 copies of the UNet, every forward unbatched, c_a drawn and z, z_r sampled anew
  before each of the N_iter pi steps and the model step.
Both take their draws from erase.draws with the same seed: each update starts from the same
t_enc. UNet image-forwards are counted by a hook (a batch of b counts b).

    python bench.py --device cuda --json bench.json          # SD-1.4 size, 64x64 latents
    python bench.py --device cuda --family sdxl --json bench-sdxl.json   # SDXL, 128x128 (1024 px)
    python bench.py --device cpu --json bench-cpu.json       # reduced: 8x8 latents, 4 DDIM steps

It also reports the time of 1000 updates (the mean update, extrapolated) and the evaluation's
generation throughput: sample.generate with the family's UNet and VAE (random weights), 100 DDIM
steps, guidance 7.5, at sample.py's defaults (CUDA: fp16, batch 16; CPU: reduced sizes); and,
without running anything, the full-size family's parameter counts and R's bytes.

Each variant runs in a child process, so that its peak memory is its own.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import erase
import family
import literal
import offline
import params
import sample
import search


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--updates", type=int, default=None, help="model updates timed after one warm-up (GPU 20, CPU 1)")
    p.add_argument("--family", default="sd1", choices=offline.KINDS,
                   help="sd1 (SD-1.4), sd2 (2.1-base), sd2-v (2.1, 768 px), sdxl (SDXL-base)")
    p.add_argument("--latent", type=int, default=None, help="latent size (GPU: the family's native "
                   "64, 96 or 128; CPU 8)")
    p.add_argument("--ddim_steps", type=int, default=None, help="GPU 50 (the default), CPU 4")
    p.add_argument("--fast_ddim_steps", type=int, default=None,
                   help="also time ours with fewer DDIM steps (GPU 10); the default stays 50")
    p.add_argument("--size", default=None, choices=["full", "tiny"],
                   help="tiny: offline.py's tiny UNet of the family (default on the CPU for other "
                        "than sd1: the counts below stay full size)")
    p.add_argument("--lora_rank", type=int, default=0, help="also time ours training a LoRA adapter of this "
                   "rank (erase.py --lora_rank) against the full --train_method")
    p.add_argument("--n_iter", type=int, default=2)
    p.add_argument("--train_method", default="xattn")
    p.add_argument("--gen_images", type=int, default=None, help="images timed after a warm-up batch (GPU 64, CPU 2)")
    p.add_argument("--gen_steps", type=int, default=None, help="DDIM steps of generation (GPU 100, CPU 3)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # ours|baseline|fast|generate, in a child process
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.size = a.size or ("full" if gpu or a.family == "sd1" else "tiny")
    a.updates = a.updates or (20 if gpu else 1)
    a.latent = a.latent or (offline.configs(a.family, "full")["unet"]["sample_size"] if gpu else 8)
    a.ddim_steps = a.ddim_steps or (50 if gpu else 4)
    a.gen_images = a.gen_images or (64 if gpu else 2)
    a.gen_steps = a.gen_steps or (100 if gpu else 3)
    return a


def build(a, vae=False):
    """The family's random UNet and text encoder(s), and the VAE where asked (training never decodes)."""
    parts = offline.build(offline.configs(a.family, a.size, latent=a.latent), vae=vae)
    from diffusers import DDIMScheduler  # as family.load_model reads the scheduler
    parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config, clip_sample=False, set_alpha_to_one=False)
    return family.assemble(parts, f"random-{a.family}", a.device)


def counts(kind):
    """The full-size family's parameter counts (shapes only, on the meta device), what each
    --train_method trains and writes, and R's bytes (fp16) for the default and CLIP vocabularies
    (their lengths from search.load_vocab on the real BPE: every family's tokenizers share it)."""
    from diffusers import UNet2DConditionModel
    cfg = offline.configs(kind, "full")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
    sizes = dict((n, p.numel()) for n, p in unet.named_parameters())
    trained = {tm: sum(sizes[n] for n in params.trained_parameter_names(unet, tm)) for tm in params.TRAIN_METHODS}
    L = 77 + (kind == "sdxl")  # SDXL: the pooled embedding's row
    row = L * cfg["unet"]["cross_attention_dim"] * 2  # one concept of R, fp16
    tok = offline.clip_tokenizer()
    words = {v: len(search.load_vocab(v, tok)) for v in ("default", "clip")}
    return dict(unet_parameters=sum(sizes.values()), trained_parameters=trained,
                attn2_modules=len({n.split(".attn2")[0] for n in sizes if "attn2" in n}),
                xattn_weights_mb=round(trained["xattn"] * 4 / 1e6, 1),
                r_words=words, r_bytes={v: n * row for v, n in words.items()}, r_shape_per_concept=[L, cfg["unet"]["cross_attention_dim"]])


def count_forwards(unet):
    """A hook that counts UNet image-forwards: a batch of b images counts b."""
    n = [0]
    unet.register_forward_pre_hook(lambda mod, args, kw: n.__setitem__(0, n[0] + len(args[0])),
                                   with_kwargs=True)
    return n


def ours_argv(a, workdir, ddim_steps):
    """erase.py's flags for both loops: EAP on a made-up R of 150 words (K = 100)."""
    vocab = os.path.join(workdir, "vocab.txt")
    open(vocab, "w").write("\n".join(f"w{i}" for i in range(150)))
    return ["--model", f"random-{a.family}", "--concept", "garbage truck", "--steps", str(a.updates + 1),
            "--vocab", vocab, "--ddim_steps", str(ddim_steps), "--n_iter", str(a.n_iter),
            "--train_method", a.train_method, "--device", a.device,
            "--out", os.path.join(workdir, f"ours-{ddim_steps}"), "--cache_dir", os.path.join(workdir, "cache")]


def run_ours(a, m, workdir, ddim_steps, extra=()):
    n = count_forwards(m.unet)
    argv = ours_argv(a, workdir, ddim_steps) + list(extra)
    result = erase.main(argv, m=m)
    log = [json.loads(line) for line in open(os.path.join(argv[argv.index("--out") + 1], "log.jsonl"))]
    timed = [r["seconds"] for r in log[1:]]  # the first update is a warm-up, not timed
    return dict(forwards=n[0], seconds=statistics.median(timed), mean_seconds=statistics.mean(timed),
                t_enc=[r["t_enc"] for r in log], file_bytes=os.path.getsize(result))


def run_baseline(a, m, unet_orig, workdir):
    """The published schedule, literal.py's transcription of it: two fp32 UNet copies, every
    forward unbatched, c_a drawn and z, z_r sampled anew before every pi step and the model
    step (resample=True). Forwards of both copies are counted."""
    n = count_forwards(m.unet)
    n2 = count_forwards(unet_orig)
    args = erase.parse_args(ours_argv(a, workdir, a.ddim_steps))
    records, _ = literal.erase_literally(m, unet_orig, args, resample=True)
    timed = [r["seconds"] for r in records[1:]]
    return dict(forwards=n[0] + n2[0], seconds=statistics.median(timed), mean_seconds=statistics.mean(timed),
                t_encs=[r["t_encs"] for r in records])


def run_generation(a):
    """Images per second of sample.generate at sample.py's defaults, after one warm-up batch."""
    m = build(a, vae=True)
    cuda = a.device.startswith("cuda")
    batch, precision = (16, "fp16") if cuda else (2, "fp32")
    sample.set_precision(m, precision)
    prompts = ["a photo of a garbage truck", "a church"] * (a.gen_images // 2 + batch)
    sample.generate(m, prompts[:batch], range(batch), 7.5, a.gen_steps, batch, progress=False)
    if cuda:
        torch.cuda.synchronize()
    tic = time.perf_counter()
    sample.generate(m, prompts[:a.gen_images], range(a.gen_images), 7.5, a.gen_steps, batch, progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    return dict(images_per_second=a.gen_images / seconds, batch=batch, precision=precision,
                pixels=m.pixels)


def child(a):
    """One variant in this process: its figures as JSON on stdout's last line."""
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if a.child == "generate":
        r = run_generation(a)
    else:
        m = build(a)
        with tempfile.TemporaryDirectory() as d:
            if a.child == "baseline":
                r = run_baseline(a, m, build(a).unet, d)  # the second copy
            elif a.child == "lora":  # the adapter file in fp16, erase.py's default
                r = run_ours(a, m, d, a.ddim_steps, ["--lora_rank", str(a.lora_rank)])
            else:
                r = run_ours(a, m, d, a.ddim_steps if a.child == "ours" else a.fast_ddim_steps)
        r["forwards_per_update"] = r.pop("forwards") / (a.updates + 1)
    gpu = a.device.startswith("cuda")
    r["peak_memory_bytes"] = (torch.cuda.max_memory_allocated() if gpu
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(r))


def spawn(a, argv, variant, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", variant, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: the {variant} run failed: {p.stderr.strip().splitlines()[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.child:
        return child(a)
    ours = spawn(a, argv, "ours")
    base = spawn(a, argv, "baseline")  # the same seed: the same draws at each update's start
    fast = spawn(a, argv, "fast") if a.fast_ddim_steps else None
    adapter = spawn(a, argv, "lora") if a.lora_rank else None
    gen = spawn(a, argv, "generate")
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    res = dict(device=name, family=a.family, size=a.size, latent=a.latent, ddim_steps=a.ddim_steps, n_iter=a.n_iter,
               updates=a.updates, train_method=a.train_method, t_enc=ours["t_enc"], t_encs_baseline=base["t_encs"],
               forwards_per_update_ours=ours["forwards_per_update"],
               forwards_per_update_baseline=base["forwards_per_update"],
               seconds_per_update_ours=ours["seconds"], seconds_per_update_baseline=base["seconds"],
               peak_memory_bytes_ours=ours["peak_memory_bytes"],
               peak_memory_bytes_baseline=base["peak_memory_bytes"],
               minutes_per_1000_updates_ours=1000 * ours["mean_seconds"] / 60,
               minutes_per_1000_updates_baseline=1000 * base["mean_seconds"] / 60,
               generation=dict(gen, steps=a.gen_steps, guidance=7.5, images=a.gen_images), counts=counts(a.family))
    rows = [("UNet image-forwards / update", "forwards_per_update", "{:.1f}"),
            ("seconds / update", "seconds_per_update", "{:.3f}"),
            ("peak memory (GiB)", "peak_memory_bytes", "{:.2f}"),
            ("1000 updates (minutes, mean)", "minutes_per_1000_updates", "{:.1f}")]
    print(f"device: {name}   {a.family}, {a.size}   latent {a.latent}x{a.latent}   ddim_steps {a.ddim_steps}   "
          f"N_iter {a.n_iter}   {a.train_method}   t_enc {ours['t_enc']}")
    print(f"{'':32s}{'ours':>12s}{'baseline':>12s}{'ratio':>10s}")
    for label, key, fmt in rows:
        o, b = res[f"{key}_ours"], res[f"{key}_baseline"]
        scale = 2 ** 30 if "memory" in key else 1
        print(f"{label:32s}{fmt.format(o / scale):>12s}{fmt.format(b / scale):>12s}{b / o:>9.2f}x")
    if fast:
        res.update(fast_ddim_steps=a.fast_ddim_steps, seconds_per_update_ours_fast=fast["seconds"],
                   forwards_per_update_ours_fast=fast["forwards_per_update"])
        print(f"ours with --ddim_steps {a.fast_ddim_steps}: {fast['forwards_per_update']:.1f} "
              f"forwards, {fast['seconds']:.3f} s / update")
    if adapter:
        res["lora"] = dict(rank=a.lora_rank, **{k: adapter[k] for k in ("seconds", "peak_memory_bytes", "file_bytes",
                                                                       "forwards_per_update")})
        res["weights_file_bytes_ours"] = ours["file_bytes"]
        print(f"LoRA r = {a.lora_rank} ({a.train_method}'s modules) against the full {a.train_method}: "
              f"{adapter['seconds']:.3f} vs {ours['seconds']:.3f} s / update, peak "
              f"{adapter['peak_memory_bytes'] / 2 ** 30:.2f} vs {ours['peak_memory_bytes'] / 2 ** 30:.2f} GiB, "
              f"file {adapter['file_bytes'] / 1e6:.2f} MB (fp16) vs {ours['file_bytes'] / 1e6:.1f} MB (fp32)")
    print(f"generation: {gen['images_per_second']:.3f} images / s ({gen['pixels']} px, {a.gen_steps} DDIM "
          f"steps, guidance 7.5, {gen['precision']}, batch {gen['batch']}, {a.gen_images} images timed)")
    c = res["counts"]
    print(f"full-size {a.family}: UNet {c['unet_parameters']:,} parameters, {c['attn2_modules']} attn2 modules; "
          f"trained: " + ", ".join(f"{k} {v:,}" for k, v in c["trained_parameters"].items())
          + f"; xattn weights {c['xattn_weights_mb']} MB; R in fp16 ({c['r_shape_per_concept'][0]} x "
          f"{c['r_shape_per_concept'][1]} a concept): default ({c['r_words']['default']:,}) "
          f"{c['r_bytes']['default'] / 1e9:.2f} GB, clip ({c['r_words']['clip']:,}) {c['r_bytes']['clip'] / 1e9:.2f} GB")
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)
    return res


if __name__ == "__main__":
    main()
