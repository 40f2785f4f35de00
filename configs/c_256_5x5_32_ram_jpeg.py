"""c_256_5x5_32_ram taught to give a photograph and its JPEG copy the same grade: each training
image is seen as it is and re-encoded at a quality from 20 to 95, and the loss adds the squared
difference of the two outputs and of the two feature vectors (retina/data/jpeg.py, the key
'consistency').  A step costs two: meant for fine-tuning a trained 256-px net
(train_nn.py --weights_from models/multi-256.pt)."""
from configs.c_256_5x5_32_ram import cnf as base, layers  # noqa: F401

cnf = dict(base, jpeg=dict(probability=0.5, quality=(20, 95), consistency=1.0),
           schedule={0: 0.001, 4: 0.0001, 7: 'stop'})
