"""Heat maps of a network's prediction: methods (where a map comes from), scores (whether it
finds lesions) and figures (how it is drawn).  `retina.ram` runs them over a folder of images."""

# The methods every script offers (ram.py --method, predict.py --heatmap --method), here so
# that a script's --help needs no torch; methods.METHODS maps each name to its function.
METHOD_NAMES = ('ram', 'gradcam', 'layercam')
METHOD_HELP = ('ram: sum_k w_k A_k of the last conv (RAM nets); gradcam: ReLU of the conv maps '
               'weighted by their mean gradient; layercam: ReLU of the maps times their '
               'positive gradient, position by position.  gradcam and layercam work on any '
               'net, baseline nets included.  Output names carry the method.')
