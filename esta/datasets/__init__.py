"""Image data for training runs: the anchors' data configuration, the paper's augmentation recipes, and
the named datasets read from local files (never downloaded).

    esta.datasets.catalog      the named datasets: layouts, splits, class counts, recipes, VTAB-1k groups
    esta.datasets.data_config  mean, std, interpolation, input size and crop from the anchors' timm configs
    esta.datasets.transforms   the "fgvc", "vtab" and "center-crop" recipes; seeded training views
    esta.datasets.images       labelled image lists, seeded splits, the dataset a run trains on
    esta.datasets.sources      opening a folder or a named dataset under its root

The submodules are imported by name (this package imports none of them), so `esta.config` can read the
catalogue without importing torchvision.
"""
