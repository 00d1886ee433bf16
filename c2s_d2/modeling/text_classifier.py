"""Text-embedding classifier: the open-vocabulary head of the student.

logits = scale * [cos(e, t_1), ..., cos(e, t_K), cos(e, n)], where ``e`` is a query's class
embedding projected to the CLIP space, ``t_k`` the class text embeddings (the *class bank*) and
``n`` a learnable "no object" embedding. Swapping the bank swaps the classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .query_decoder import MLP


class TextEmbeddingClassifier(nn.Module):
    """Cosine classifier over a swappable bank of text embeddings plus "no object"."""

    def __init__(self, hidden_dim: int, embed_dim: int, logit_scale: float, learnable_scale: bool):
        """
        Args:
            hidden_dim: width of the decoder's query embeddings.
            embed_dim: CLIP embedding size d.
            logit_scale: multiplier of the cosine similarities (initial value if learnable).
            learnable_scale: learn ``log(scale)``.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.class_proj = MLP(hidden_dim, hidden_dim, embed_dim, 2)
        self.no_object_embedding = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        log_scale = torch.tensor(math.log(logit_scale))
        if learnable_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale, persistent=False)

    def embed(self, query_embeds: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> normalised class embeddings [..., d] (the student's region embeddings)."""
        return F.normalize(self.class_proj(query_embeds), dim=-1)

    def forward(self, class_embeds: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """
        Args:
            class_embeds: normalised [..., d].
            bank: normalised text embeddings [K, d].
        Returns:
            logits [..., K + 1] (last = no object).
        """
        if bank.shape[-1] != self.embed_dim:
            raise ValueError(
                f"text embeddings have size {bank.shape[-1]}, the classifier expects {self.embed_dim}"
                " (was the CLIP model changed after training?)"
            )
        no_obj = F.normalize(self.no_object_embedding, dim=-1)[None]
        weights = torch.cat([bank.to(class_embeds.dtype), no_obj.to(class_embeds.dtype)], dim=0)
        return self.log_logit_scale.exp() * class_embeds @ weights.t()
