"""Photographs and labels: decoding, the eye's crop, preprocessing, the converted-image cache,
labels and splits, public data sets, the synthetic generator, pixel constants, gradability
checks."""
