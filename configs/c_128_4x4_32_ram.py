"""c_128_4x4_32 with the RAM head: global average pool + linear output (regression activation maps)."""
from configs.c_128_4x4_32 import cnf as base, layers as base_layers
from retina.nets import ram_head, replace_head

cnf = dict(base)

layers = replace_head(base_layers, ram_head())
