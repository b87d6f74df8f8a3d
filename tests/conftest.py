"""Shared fixtures: tiny random SD-1.x, SD-2.x and SDXL folders built from configs (offline.py), offline."""
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups fail at once instead of retrying
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_sd(tiny_kind):
    """Path of a tiny random SD-1.x diffusers folder (UNet (32, 64), 2-layer CLIP text
    encoder with the real 49,408-token tokenizer, tiny VAE, SD-1.4's DDIM scheduler)."""
    return tiny_kind("sd1")


@pytest.fixture(scope="session")
def vocab(tmp_path_factory):
    """A small concept space R, one word a line."""
    f = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    f.write_text("truck\ncar\nroad\nchurch\nbus\ntree\nred\nmusic\nlexus\nwaste\n")
    return str(f)


@pytest.fixture(scope="session")
def tiny_kind(tmp_path_factory):
    """tiny_kind(kind): the path of a tiny random folder of that kind (offline.KINDS: sd1, sd2,
    sd2-v, sdxl), built once per session."""
    import offline
    built = {}

    def folder(kind):
        if kind not in built:
            built[kind] = offline.save_random_pipeline(str(tmp_path_factory.mktemp(f"tiny-{kind}")), kind)
        return built[kind]
    return folder
