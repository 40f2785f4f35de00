"""Heat maps of a network's prediction: methods (where a map comes from), scores (whether it
finds lesions) and figures (how it is drawn).  `retina.ram` runs them over a folder of images."""
