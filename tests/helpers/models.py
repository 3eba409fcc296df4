"""Tiny models shared by the training-layer tests: timm ViTs small enough for the CPU, a generic MLP-block
anchor, the three-anchor StitchableModel most tests train, and a recorder of the gradients each optimizer
step sees. timm is imported only when a ViT is built (tests that need it skip without it first)."""
import torch
from torch import nn

from esta import SequentialBlocksAnchor, StitchableModel, TimmViTAnchor

WIDTHS = (16, 24, 32)
"""Embedding widths of the three anchors of `tiny_model`."""


def tiny_vit(dim, seed, depth=3, heads=2, **kw):
    """A timm VisionTransformer on 16x16 images, 4x4 patches, 5 classes, in eval mode, seeded."""
    import timm

    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=dim, depth=depth, num_heads=heads, num_classes=5, **kw).eval()


def tiny_images(n, seed=0):
    """n random 3x16x16 images (the input of `tiny_vit`), seeded."""
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def tiny_model(**kw):
    """StitchableModel of three tiny ViTs (widths WIDTHS), in eval mode."""
    return StitchableModel([TimmViTAnchor(tiny_vit(d, i)) for i, d in enumerate(WIDTHS)], **kw).eval()


class MLPBlock(nn.Module):
    """A residual two-layer MLP block, for anchors that are not transformers."""

    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def generic_anchor(dim, family="mlp", embed_type="linear16", depth=3):
    """A SequentialBlocksAnchor of MLPBlocks on 16 input features, 5 classes, seeded by its width."""
    torch.manual_seed(dim)
    return SequentialBlocksAnchor(nn.Linear(16, dim), nn.ModuleList(MLPBlock(dim) for _ in range(depth)),
                                  nn.Linear(dim, 5), family=family, embed_type=embed_type)


def record_grads(trainer):
    """Wraps the trainer's optimizer step to record {name: grad} at each step; returns the (growing) list."""
    grads = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return grads
