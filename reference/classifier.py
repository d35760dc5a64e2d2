"""A small CNN that reads the three attributes (shape, colour, position) of a
reference image. It scores generated images (is the requested shape there?)
and its penultimate layer is the feature space for Fréchet distances.

The weights are trained by scripts/train_classifier.py and stored as
safetensors only.
"""
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .shapes import ATTRIBUTES, IMAGE_SIZE

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"
FEATURE_DIM = 128
_CHANNELS = (3, 8, 16, 32, 64)
_CHUNK = 256   # images per forward pass in features/predict: bounds activation memory


class ShapeClassifier(nn.Module):
    """[N, 3, 64, 64] images in [0, 1] -> one logit vector per attribute."""

    def __init__(self):
        super().__init__()
        layers = []
        for in_channels, out_channels in zip(_CHANNELS, _CHANNELS[1:]):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.convolutions = nn.Sequential(*layers)
        # Flatten rather than global pooling: position is an attribute, so where things are must survive.
        side = IMAGE_SIZE // 2 ** (len(_CHANNELS) - 1)
        self.embedding = nn.Sequential(nn.Flatten(), nn.Linear(_CHANNELS[-1] * side * side, FEATURE_DIM), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(FEATURE_DIM, len(values)) for values in ATTRIBUTES.values())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.convolutions(images - 0.5))

    def forward(self, images: torch.Tensor) -> list:
        """Logits [N, classes] per attribute, in ATTRIBUTES order."""
        embedded = self.embed(images)
        return [head(embedded) for head in self.heads]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [N, FEATURE_DIM], for Fréchet distances."""
        return torch.cat([self.embed(chunk.float()) for chunk in images.split(_CHUNK)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted labels [N, 3] long: (shape, colour, position), as shapes.batch labels them."""
        return torch.cat([torch.stack([logits.argmax(dim=1) for logits in self(chunk.float())], dim=1)
                          for chunk in images.split(_CHUNK)])


def load_classifier(path=WEIGHTS_PATH) -> ShapeClassifier:
    """The trained classifier from a safetensors file, in eval mode on the CPU."""
    model = ShapeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fraction correct per attribute, and "all" for images with all three right."""
    correct = predicted == labels
    scores = {name: correct[:, index].float().mean().item() for index, name in enumerate(ATTRIBUTES)}
    scores["all"] = correct.all(dim=1).float().mean().item()
    return scores
