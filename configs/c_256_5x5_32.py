"""net-5 at 256 pixels (224×224 input), started from the 128-pixel net's weights."""
from configs.c_128_5x5_32 import cnf as base
from retina.model.nets import baseline_head, trunk_5x5

cnf = dict(base, w=224, h=224, train_dir='data/train_small', test_dir='data/test_small')

layers = trunk_5x5(blocks=4) + baseline_head(rms_stride=3)
