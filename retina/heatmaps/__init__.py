"""Heat maps of a network's prediction: methods (where a map comes from), scores (whether it
finds lesions) and figures (how it is drawn).  `retina.heatmaps.ram` runs them over a folder of images."""

# The methods every script offers (ram.py --method, predict.py --heatmap --method), here so
# that a script's --help needs no torch; methods.METHODS maps each name to its function.
METHOD_NAMES = ('ram', 'gradcam', 'layercam')
METHOD_HELP = ('ram: sum_k w_k A_k of the last conv (RAM nets); gradcam: ReLU of the conv maps '
               'weighted by their mean gradient; layercam: ReLU of the maps times their '
               'positive gradient, position by position.  gradcam and layercam work on any '
               'net, baseline nets included.  Output names carry the method.')

# The map predict.py --heatmap draws for a released model when none of --method, --layer and
# --fuse is given, chosen by bench/bench_heatmaps.py on HEI-MED and synthetic masks (the mean
# lead over the image-blind map across lesion kinds, exact pointing beside it;
# bench/heatmap_default.md): for eyepacs-256 and multi-256-jpeg their RAM fused with
# eyepacs-128-fine's, which ties the fine net alone (eyepacs-256) or leads every map of the net
# (multi-256-jpeg) and shows the grading net's own evidence.  A released chain draws its fast
# net's entry; any other net draws its RAM.
RELEASED_DEFAULT_MAPS = {
    'eyepacs-256': dict(method='ram', layer=None, fuse='eyepacs-128-fine'),
    'multi-256-jpeg': dict(method='ram', layer=None, fuse='eyepacs-128-fine'),
}


def released_name(weights):
    """The name of the released model whose file `weights` (a path) is, or None."""
    from pathlib import Path

    from retina.core.errors import UserError
    from retina.model import released
    try:
        models = released.index()['models']
    except UserError:
        return None
    for name, entry in models.items():
        if Path(weights).resolve() == (released.default_folder() / entry['file']).resolve():
            return name
    return None


def released_default_map(weights):
    """(released name, its RELEASED_DEFAULT_MAPS entry) when `weights` (a path) is the file of
    a released model that has one, else None."""
    name = released_name(weights)
    return (name, RELEASED_DEFAULT_MAPS[name]) if name in RELEASED_DEFAULT_MAPS else None
