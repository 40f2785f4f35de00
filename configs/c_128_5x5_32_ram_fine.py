"""The heat-map partner of c_128_5x5_32_ram (the RAM repository's configs_CAM 128-px net):
strides 1 instead of 2 so the last conv is 53 × 53 (6 × 6 in c_128_5x5_32_ram), no batch norm,
weight decay 0.0005, the RAM head.  Trained like any config; its maps localise lesions."""
from configs.c_128_5x5_32 import cnf as base
from retina.model.nets import fine_trunk_128, ram_head

cnf = dict(base, schedule={0: 0.003, 150: 0.0003, 201: 'stop'})

layers = fine_trunk_128() + ram_head()
