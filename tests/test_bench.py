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

