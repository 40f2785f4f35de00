"""The heat-map partner of c_256_5x5_32_ram (the RAM repository's configs_CAM 256-px net):
net-5 to the first pool, then stride 1 and no further pool, so the last conv is 55 × 55; no batch
norm, weight decay 0.0005, the RAM head.  `ram.py --fuse` combines its maps with the 128-px net's."""
from configs.c_256_5x5_32 import cnf as base
from retina.model.nets import fine_trunk_256, ram_head

cnf = dict(base, schedule={0: 0.003, 150: 0.0003, 201: 'stop'})

layers = fine_trunk_256() + ram_head()
