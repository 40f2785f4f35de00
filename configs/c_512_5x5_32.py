"""net-5 at 512 pixels (448×448 input), started from the 256-pixel net's weights."""
from configs.c_256_5x5_32 import cnf as base
from retina.model.nets import baseline_head, trunk_5x5

cnf = dict(base, w=448, h=448, train_dir='data/train_medium', test_dir='data/test_medium',
           batch_size_train=32, batch_size_test=32,
           schedule={0: 0.003, 150: 0.0003, 220: 0.00003, 251: 'stop'})

layers = trunk_5x5(blocks=5) + baseline_head(rms_stride=3)
