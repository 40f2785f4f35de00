"""net-4 at 256 pixels, started from the 128-pixel net-4's weights."""
from configs.c_256_5x5_32 import cnf as base
from retina.model.nets import baseline_head, trunk_4x4

cnf = dict(base, sigma=0.25,
           aug_params=dict(base['aug_params'], translation_range=(-20, 20)))

layers = trunk_4x4(blocks=4) + baseline_head(rms_stride=2)
