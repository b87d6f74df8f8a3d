"""Every erase.py, sample.py (grid), offline.py and bench.py command in the README and docs/*.md
runs here, on a tiny random model, CPU, a few steps (flags appended last override the README's).
Those with `--model toy` run in tests/test_toy.py, on the toy model. The other test files take
their sections of the documentation from `section` here."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import erase
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pages():
    """README.md, then each docs/*.md in name order."""
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def documentation():
    """The whole documentation as one text: README.md followed by each docs/*.md (sorted)."""
    return "\n".join(open(p).read() for p in pages())


def section(heading):
    """Every part of the documentation under `heading`, in pages() order, joined: a docs page
    titled `# heading...`, whole (its `## ` subsections included), and in any page the text from
    `## heading...` to the next `## ` heading."""
    parts = []
    for path in pages():
        text = open(path).read()
        if text.startswith(f"# {heading}"):
            parts.append(text)
        elif f"\n## {heading}" in text:
            text = text[text.index(f"\n## {heading}"):]
            end = text.find("\n## ", 1)
            parts.append(text if end < 0 else text[:end])
    assert parts, f"no section {heading!r} in README.md or docs/"
    return "\n".join(parts)


def readme_commands(script):
    text = documentation().replace("\\\n", " ")
    return [shlex.split(line.strip(), comments=True)[2:] for line in text.splitlines()
            if line.strip().startswith(f"python {script} ") and "--model toy" not in line]


ERASE = readme_commands("erase.py")


def test_the_readme_has_the_commands():
    assert ERASE and readme_commands("sample.py") and readme_commands("bench.py")
    assert ["--concept", "garbage truck"] in ERASE


FAMILIES = ["sd1", "sd2-v", "sdxl"]  # SD-1.4, SD-2.1 (768 px, v-prediction), SDXL-base: tiny random twins


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("argv", ERASE, ids=[" ".join(a)[:60] for a in ERASE])
def test_erase_commands(argv, kind, tiny_kind, tmp_path):
    """Each README erase.py command runs on every family (the same command with --model FOLDER),
    records the settings it names, and changes the UNet."""
    import json
    from safetensors.torch import load_file
    from family import load_model
    tiny_sd = tiny_kind(kind)
    test_flags = ["--model", tiny_sd, "--steps", "2", "--ddim_steps", "3", "--device", "cpu",
                  "--out", str(tmp_path / "out"), "--cache_dir", os.path.join(os.path.dirname(tiny_sd), "cache")]
    named = vars(erase.parse_args(argv))  # what the README's command alone asks for
    if named["method"] == "uce":  # no loop: --steps and --ddim_steps mean nothing to it
        test_flags = [f for f in test_flags if f not in ("--steps", "2", "--ddim_steps", "3")]
    if named["method"] == "ca":  # a few anchor images, not 200
        test_flags += ["--ca_images", "4"]
    path = erase.main(argv + test_flags)
    config = json.load(open(tmp_path / "out" / "config.json"))
    for flag in (a[2:] for a in argv if a.startswith("--")):
        key = {"soft": "hard"}.get(flag, flag)
        if f"--{flag}" not in test_flags:
            assert config[key] == named[key], (flag, config[key], named[key])
    if named["lora_rank"]:  # an adapter: it loads, and its B (0 at the start) has moved
        import params
        m = load_model(tiny_sd)
        params.load_weights(m, path)
        B = [p for n, p in m.unet.named_parameters() if "lora_B" in n]
        assert B and any(b.abs().max() > 0 for b in B)
    else:
        original = dict(load_model(tiny_sd).unet.named_parameters())
        saved = load_file(path)
        assert saved and any(not torch.equal(saved[n], original[n]) for n in saved)
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    if named["method"] != "uce":
        assert [r["c_e"] in named["concepts"] for r in log] == [True, True]


def test_offline_commands(tmp_path):
    for argv in readme_commands("offline.py"):
        argv = [str(tmp_path / a[5:]) if a.startswith("/tmp/") else a for a in argv]
        subprocess.run([sys.executable, os.path.join(ROOT, "offline.py"), *argv], check=True)
        assert os.path.isfile(os.path.join(argv[1], "model_index.json"))


@pytest.mark.parametrize("kind", FAMILIES)
def test_sample_commands(kind, tiny_kind, tmp_path):
    tiny_sd = tiny_kind(kind)
    weights = erase.main(["--model", tiny_sd, "--concept", "church", "--method", "esd", "--steps", "1",
                          "--ddim_steps", "2", "--device", "cpu", "--out", str(tmp_path / "out")])
    for argv in readme_commands("sample.py"):
        if "--csv" in argv:
            continue  # prompt files: tests/test_evaluate.py runs the evaluation commands
        argv = [weights if a.endswith(".safetensors") else a for a in argv]
        sample.main(argv + ["--model", tiny_sd, "--steps", "2", "--device", "cpu",
                            "--out", str(tmp_path / "grid.png")])
        assert (tmp_path / "grid.png").exists()


def test_bench_commands(tmp_path):
    """Each README bench.py command on the CPU at the tiny size (commands that differ only in
    --device and --json run once). The SDXL run's full-size counts are SDXL-base's: 2,567,463,684
    UNet parameters, 70 attn2 modules (545,670,400 parameters), R at 78 x 2048 a concept in fp16;
    and its forwards per update follow the same formula as SD-1.4's (tests/test_bench.py)."""
    import json
    seen = set()
    for argv in readme_commands("bench.py"):
        for flag in ("--json", "--device"):  # the test's own folder, and the CPU
            if flag in argv:
                i = argv.index(flag)
                argv = argv[:i] + argv[i + 2:]
        if tuple(argv) in seen:
            continue
        seen.add(tuple(argv))
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *argv, "--device", "cpu",
                            "--size", "tiny", "--updates", "1", "--ddim_steps", "3", "--gen_steps", "2",
                            "--json", str(tmp_path / "b.json")], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-1000:]
        r = json.load(open(tmp_path / "b.json"))
        n = len(r["t_enc"])
        assert r["forwards_per_update_ours"] == sum(4 * t + 2 * 2 + 4 for t in r["t_enc"]) / n
        if "sdxl" in argv:
            c = r["counts"]
            assert r["family"] == "sdxl" and c["unet_parameters"] == 2_567_463_684 and c["attn2_modules"] == 70
            assert c["trained_parameters"]["xattn"] == 545_670_400 and c["r_shape_per_concept"] == [78, 2048]
            assert c["r_words"] == {"default": 2994, "clip": 46585}  # the published lists' lengths
            assert c["r_bytes"]["clip"] == 46585 * 78 * 2048 * 2
    assert len(seen) == 3


def test_setup_is_two_commands_and_requirements_cover_every_import():
    """README's set-up is `pip install -r requirements.txt` and the test command, .ci/run does
    the same, and requirements.txt names the distribution of every third-party module that a
    script or a test imports (open_clip: offline.py finds the tokenizer's merges in its wheel)."""
    import ast
    import importlib.metadata
    import re
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("## Tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.strip().splitlines() == ["pip install -r requirements.txt", "python -m pytest -q"]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "pip install -q -r requirements.txt" in ci and "python -m pytest -q" in ci
    files = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    files += [os.path.join("tests", f) for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")]
    ours = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} | {"tests", "conftest"}
    ours |= {f[:-3] for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")}  # test_readme's section
    modules = set()
    for f in files:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, f)).read())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | ours
    modules.add("open_clip")  # found with importlib, not imported
    norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731
    listed = {norm(re.split(r"[<>=!~\[; ]", line.strip())[0])
              for line in open(os.path.join(ROOT, "requirements.txt")) if line.strip() and not line.startswith("#")}
    dists = importlib.metadata.packages_distributions()
    missing = {m: dists.get(m) for m in modules if not {norm(d) for d in dists.get(m, [m])} & listed}
    assert not missing, missing


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_diffusers_snippet(kind, tiny_kind, tmp_path):
    """The README's Python snippet (the SDXL line for SDXL), on a tiny model and the CPU: the
    erased weights load into diffusers' own pipeline and it draws."""
    text = documentation()
    code = text.split("## Use the result in diffusers", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    if kind == "sdxl":
        code = "\n".join(line.replace("# SDXL: ", "") if line.startswith("# SDXL: ") else line
                         for line in code.splitlines() if "StableDiffusionPipeline.from_pretrained" not in line)
    weights = erase.main(["--model", tiny_kind(kind), "--concept", "garbage truck", "--method", "esd", "--steps", "1",
                          "--ddim_steps", "2", "--device", "cpu", "--out", str(tmp_path / "out")])
    for hub in ("CompVis/stable-diffusion-v1-4", "stabilityai/stable-diffusion-xl-base-1.0"):
        code = code.replace(f'"{hub}"', repr(tiny_kind(kind)))
    code = code.replace('"cuda"', '"cpu"').replace('"out/weights.safetensors"', repr(weights))
    scope = {}
    exec(code.replace('pipe("a garbage truck on a road")', 'pipe("a garbage truck on a road", num_inference_steps=2)'),
         scope)
    assert type(scope["pipe"]).__name__ == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    assert scope["image"].size == (16, 16)


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_every_link_resolves():
    """README.md stays at most 250 lines (the rest lives in docs/), and every relative link in
    README.md and docs/*.md (images too) names an existing file, and a heading of it after `#`."""
    assert len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 250
    checked = 0
    for path in pages():
        prose = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)  # links in code are code
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            assert os.path.isfile(file), (os.path.relpath(path, ROOT), target)
            if anchor:
                text = re.sub(r"```.*?```", "", open(file).read(), flags=re.S)
                headings = {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}
                assert anchor in headings, (os.path.relpath(path, ROOT), target)
            checked += 1
    assert checked >= 20  # the README links every docs page, and each page the README
