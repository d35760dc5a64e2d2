"""Class labels -> a text-like conditioning tensor for the reference model.

One learned embedding table per attribute (its last row is "unspecified",
used for the unconditional branch of CFG); each attribute becomes one context
token, so the model sees [N, 3, CONTEXT_DIM] like a 3-token prompt.
"""
import torch

from .shapes import ATTRIBUTES

CONTEXT_DIM = 64


class LabelEncoder(torch.nn.Module):
    def __init__(self, dim: int = CONTEXT_DIM):
        super().__init__()
        self.tables = torch.nn.ModuleDict({name: torch.nn.Embedding(len(values) + 1, dim)
                                           for name, values in ATTRIBUTES.items()})

    def null_labels(self, count: int) -> torch.Tensor:
        return torch.tensor([[len(v) for v in ATTRIBUTES.values()]] * count)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels [N, 3] (index len(values) = unspecified) -> context [N, 3, dim]."""
        return torch.stack([table(labels[:, i]) for i, table in enumerate(self.tables.values())], dim=1)
