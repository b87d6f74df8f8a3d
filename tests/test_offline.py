"""offline.py rebuilds SD-1.4's tokenizer and architecture exactly."""
import torch
from diffusers import UNet2DConditionModel

import offline
from params import trained_parameter_names


def test_tokenizer_is_sd14s():
    tok = offline.clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a garbage truck").input_ids == [49406, 320, 1125, 539, 320, 13760, 4629, 49407]
    assert tok("", padding="max_length", max_length=77).input_ids == [49406] + [49407] * 76


def test_sd14_unet_has_sd14s_parameter_counts():
    with torch.device("meta"):  # shapes only, no memory
        unet = UNet2DConditionModel(**offline.sd14_configs()[0])
    parameters = dict(unet.named_parameters())
    assert sum(p.numel() for p in parameters.values()) == 859_520_964
    xattn = trained_parameter_names(unet, "xattn")
    assert sum(parameters[n].numel() for n in xattn) == 43_962_560  # 176 MB of float32 in weights.safetensors
    assert len({n.split(".attn2")[0] for n in xattn}) == 16
