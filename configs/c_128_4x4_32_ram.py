"""c_128_4x4_32 as the RAM repository had it: the RAM head (global average pool + linear output,
which makes the regression activation map exact), batch norm on the input and after every conv
but the last, no weight decay, its own schedule."""
from configs.c_128_4x4_32 import cnf as base, layers as base_layers
from retina.model.nets import ram_head, replace_head, with_batch_norm

cnf = dict(base, weight_decay=0.0, schedule={0: 0.003, 150: 0.0003, 201: 'stop'})

layers = with_batch_norm(replace_head(base_layers, ram_head()))
