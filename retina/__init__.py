"""Diabetic retinopathy grading with regression activation maps.

A PyTorch port of the 2015 Kaggle DR 2nd-place pipeline (team o_O) with the
RAM head of Wang & Yang.  The scripts at the top of the repository are thin
click wrappers around the modules of this package.

Glossary: one name per idea, in code, records and docs.

- *config*: a module of configs/ (`cnf` settings and `layers`), loaded by
  retina.model.config; its *name* (c_512_5x5_32_ram) names its run folder, features and maps.
- *net*: the nn.Module a config builds (retina.model.nets; layer kinds are registered there,
  `nets.layer_kind`).  A *RAM net* has a global-average-pool head: `nets.is_ram_net`
  (layer list) and `nets.ram_exact` (module) are the only tests of it.
- *loaded net*: `checkpoint.LoadedNet`, a trained net with what its checkpoint says about
  its input (preprocessing, pixel constants); every stage after training takes one.
- *preprocessing*: what convert.py did to the photographs beyond cropping, one of
  `preprocess.PREPROCESSING` (chosen with --enhance; recorded as `preprocessing`).
- *pixel constants*: the mean, std and colour PCA that standardise a net's input
  (`augment.PixelConstants`; a config's own or the Kaggle ones).
- *centred window*: the net's input cut from the middle of a converted image with no
  augmentation (`augment.centre_crop`); *TTA*: the mean over `augment.tta_params`.
- *run*: a training run, the folder weights/NAME/ (retina/train/runs.py); a *blend run* is
  one entry of blend.yml, the feature files blended together (retina/blend/files.py).
- *heat-map method*: ram, gradcam or layercam (`heatmaps.METHOD_NAMES`), computed in
  retina/heatmaps/methods.py for every script.
- *test split*: the patients `data.held_out` keeps out (train_nn.py --hold_out); the
  *validation split* is `data.split_indices` of the rest.
"""
