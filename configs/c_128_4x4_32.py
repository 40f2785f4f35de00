"""net-4 at 128 pixels: 4×4 kernels, less translation and colour noise than net-5."""
from configs.c_128_5x5_32 import cnf as base
from retina.model.nets import baseline_head, trunk_4x4

cnf = dict(base, sigma=0.25,
           aug_params=dict(base['aug_params'], translation_range=(-10, 10)))

layers = trunk_4x4(blocks=3) + baseline_head(rms_stride=2)
