"""c_128_5x5_32_ram taught to give a photograph and its JPEG copy the same grade, as
c_256_5x5_32_ram_jpeg is (retina/data/jpeg.py, the key 'consistency'): each training image seen as
it is and re-encoded at a quality from 20 to 95.  Meant for fine-tuning a trained 128-px net
(train_nn.py --weights_from models/multi-128.pt)."""
from configs.c_128_5x5_32_ram import cnf as base, layers  # noqa: F401

cnf = dict(base, jpeg=dict(probability=0.5, quality=(20, 95), consistency=1.0),
           schedule={0: 0.001, 4: 0.0001, 7: 'stop'})
