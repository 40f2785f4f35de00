"""net-5 at 128 pixels (112×112 input): the first net of the chain 128 -> 256 -> 512."""
from retina.model.nets import baseline_head, trunk_5x5

cnf = dict(
    w=112,
    h=112,
    train_dir='data/train_tiny',
    test_dir='data/test_tiny',
    labels='data/trainLabels.csv',
    batch_size_train=128,
    batch_size_test=128,
    balance_ratio=0.975,
    aug_params=dict(zoom_range=(1 / 1.15, 1.15), rotation_range=(0, 360), shear_range=(0, 0),
                    translation_range=(-40, 40), do_flip=True, allow_stretch=True),
    sigma=0.5,
    # JPEG re-encoding of half the training images at qualities 10..95 (retina/data/jpeg.py): photos
    # arrive compressed, and a net that never saw blocks takes them for lesions
    jpeg=dict(probability=0.5, quality=(10, 95)),
    schedule={0: 0.003, 150: 0.0003, 201: 'stop'},
    momentum=0.9,
    weight_decay=0.0005,
)

layers = trunk_5x5(blocks=3) + baseline_head(rms_stride=3)
