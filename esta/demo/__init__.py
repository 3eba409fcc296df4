"""Demo assets for `esta demo`: a small real task (scikit-learn digits) and pretrained ViT anchors."""
