"""Demo assets for `esta demo`: small ViT anchors pretrained on scikit-learn's digits 0-4, and the tasks
(`esta.demo.data`): digits and letters rendered from matplotlib's bundled fonts, the demo's target task."""
