"""The toy world's judge: a small CNN that reads a 16x16 image as a colour and a shape, used as
ResNet-50 is on SD-1.4 (evaluate.py esr-psr --classifier toy, attack.py --classifier toy, the
toy benchmark). toy.py trains it (`python toy.py oracle`) on the world's drawings."""
import os

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from cli import UsageError

ORACLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "oracle.safetensors")


def oracle_net():
    """A small CNN: (B, 3, 16, 16) in [0, 1] -> 6 colour logits and 6 shape logits."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 16, 8, 8)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, 4, 4)
        nn.Flatten(), nn.Linear(32 * 16, 128), nn.ReLU(), nn.Linear(128, 12))


def load_oracle(path=ORACLE):
    if not os.path.isfile(path):
        raise UsageError(f"no oracle at {path}: run `python toy.py oracle`")
    net = oracle_net()
    net.load_state_dict(load_file(path))
    return net.eval()


class Concepts(nn.Module):
    """The oracle as a 36-way classifier, as ResNet-50 is a 1000-way one (evaluate.py esr-psr
    --classifier toy): log p(colour) + log p(shape), at index 6 colour + shape (CONCEPTS)."""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):  # (B, 3, 16, 16) in [0, 1] -> (B, 36)
        logits = self.net(x)
        return (logits[:, :6].log_softmax(1)[:, :, None] + logits[:, 6:].log_softmax(1)[:, None]).flatten(1)


def to_tensor(image):
    """A PIL image or uint8 array (16, 16, 3) -> (3, 16, 16) in [0, 1], the oracle's input."""
    return torch.from_numpy(np.array(image.convert("RGB") if hasattr(image, "convert") else image)
                            ).permute(2, 0, 1).float() / 255


@torch.no_grad()
def recognise(net, images):
    """The oracle's top-1 concept (index into CONCEPTS) of each uint8 image (16, 16, 3)."""
    x, judge = torch.stack([to_tensor(im) for im in images]), Concepts(net)
    return torch.cat([judge(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)]).numpy()
