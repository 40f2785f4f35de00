"""The net: layers and configs, augmentation and the input spec, checkpoints and the loaded
net, scoring, released models, feature statistics."""
