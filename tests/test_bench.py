"""bench.py runs (tiny size, CPU) and counts what the published schedule costs more."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke_counts_forwards(tmp_path):
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cpu", "--size",
                        "tiny", "--updates", "2", "--ddim_steps", "6", "--json", str(out)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.load(open(out))
    for key in ("device", "forwards_per_update_ours", "forwards_per_update_baseline",
                "seconds_per_update_ours", "seconds_per_update_baseline",
                "peak_memory_bytes_ours", "peak_memory_bytes_baseline",
                "minutes_per_1000_updates_ours", "minutes_per_1000_updates_baseline"):
        assert key in r
    assert r["generation"]["images_per_second"] > 0 and r["generation"]["steps"] == 3
    # per update, t_enc DDIM steps with guidance: ours samples z and z_r once (4 t_enc), runs
    # 2 forwards per search step and 4 in the model step (Eq. 3's target needs no eps(c_e));
    # the baseline (literal.py, the published schedule) samples both anew before each of its
    # N_iter + 1 iterations (4 t_enc each), 2 per search step, 4 in the model step
    n = len(r["t_enc"])
    ours = sum(4 * t + 2 * 2 + 4 for t in r["t_enc"]) / n
    base = sum(sum(4 * t for t in ts) + 2 * 2 + 4 for ts in r["t_encs_baseline"]) / n
    assert r["forwards_per_update_ours"] == ours and r["forwards_per_update_baseline"] == base
    assert [ts[0] for ts in r["t_encs_baseline"]] == r["t_enc"]  # each update starts from the same draws
    assert all(len(ts) == 3 for ts in r["t_encs_baseline"])  # N_iter 2: three samplings
    assert "ours" in p.stdout and "baseline" in p.stdout


def test_bench_on_sdxl_counts_the_same_forwards_and_the_full_size_model(tmp_path):
    """--family sdxl on the CPU: the loops on the tiny SDXL (the forward counts are the
    family's formula, unchanged), and the full-size SDXL-base's counts: 2,567,463,684 UNet
    parameters, 70 attn2 modules (545,670,400 parameters, 2.18 GB as float32), R in fp16 at
    78 x 2048 a concept (the default list 0.94 GB, the CLIP words 10.5 GB)."""
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cpu", "--family", "sdxl",
                        "--updates", "1", "--ddim_steps", "3", "--gen_steps", "2", "--json", str(out)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.load(open(out))
    assert (r["family"], r["size"]) == ("sdxl", "tiny")
    n = len(r["t_enc"])
    assert r["forwards_per_update_ours"] == sum(4 * t + 2 * 2 + 4 for t in r["t_enc"]) / n
    c = r["counts"]
    assert c["unet_parameters"] == 2_567_463_684 and c["attn2_modules"] == 70
    assert c["trained_parameters"]["xattn"] == 545_670_400 and c["r_shape_per_concept"] == [78, 2048]
    assert c["r_bytes"]["clip"] == 32875 * 78 * 2048 * 2
