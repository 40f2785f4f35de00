"""net-4 at 512 pixels, started from the 256-pixel net-4's weights."""
from configs.c_512_5x5_32 import cnf as base
from retina.model.nets import baseline_head, trunk_4x4

cnf = dict(base, sigma=0.25, batch_size_train=48, batch_size_test=48)

layers = trunk_4x4(blocks=5) + baseline_head(rms_stride=2)
