"""The nets predict.py grades with: a trained net with how predict.py feeds and reports it
(`Grader`, `load_grader`), its scores, TTA features and heat maps on a batch of prepared
photographs (`score_batch`, through `retina.model.scoring` like every other stage), and a blend
fitted by blend.py (`LoadedBlend`)."""
import dataclasses
from pathlib import Path

import numpy as np
import torch

from retina.core.errors import UserError
from retina.data.cache import check_side, converted_size
from retina.data.crop import as_stored
from retina.features.files import mean_and_std
from retina.model import checkpoint, feature_stats, released, scoring
from retina.model.nets import ram_exact


@dataclasses.dataclass
class Grader:
    """One trained net (`checkpoint.LoadedNet`) and how predict.py feeds and reports it."""
    loaded: object          # checkpoint.LoadedNet
    crop_size: int          # S: the converted image side its window is cut from
    column: str = ''        # its score column in the output
    feature_stats: object = None  # feature_stats.FeatureStats of its training photographs

    @property
    def config(self):       # the config the weights were trained with
        return self.loaded.config

    @property
    def net(self):
        return self.loaded.net

    @property
    def weights(self):
        return self.loaded.weights

    @property
    def spec(self):           # checkpoint.InputSpec: its window, look, constants, cut-offs
        return self.loaded.spec

    @property
    def preprocessing(self):  # retina.data.preprocess method of its training images
        return self.loaded.preprocessing

    @property
    def constants(self):      # the pixel constants it was trained with
        return self.loaded.constants

    @property
    def input_size(self):
        return self.loaded.input_size

    @property
    def is_ram(self):
        return ram_exact(self.net)

    @property
    def fingerprint(self):
        return self.loaded.fingerprint


def load_grader(cnf, weights_from=None, device='cpu', crop_size=None):
    """A `Grader` for config `cnf` (name or path) with `weights_from` (default: its best-kappa
    weights, weights/CNF/weights.pt; `checkpoint.resolve_weights`), the photographs converted
    to `crop_size` [default: the net's converted size]."""
    loaded = checkpoint.load_net(cnf, weights_from, device)
    size = crop_size or loaded.spec.size
    window, expected = max(loaded.input_size), converted_size(loaded.input_size)
    check_side(size, loaded.input_size, f'--crop_size {size}', loaded.name,  # as transform.py
               fix=f'use a size from {window} to {expected} (or leave --crop_size out)')
    return Grader(loaded=loaded, crop_size=size, feature_stats=feature_stats.FeatureStats
                  .from_state(loaded.state.get('feature_stats')))


def name_columns(graders):
    """Score columns named after the configs (score_c_512_5x5_32), numbered when one repeats."""
    counts = {}
    for grader in graders:
        counts[grader.config.name] = counts.get(grader.config.name, 0) + 1
    seen = {}
    for grader in graders:
        name = grader.config.name
        seen[name] = seen.get(name, 0) + 1
        grader.column = f'score_{name}' + (f'_{seen[name]}' if counts[name] > 1 else '')



def model_identity(graders, blend=None):
    """('eyepacs-256', its sha256): what graded, for the outputs: each net's released name (by
    checksum) or weights file, then the blend's (a released chain's name, or its file), joined
    with '+', and their sha256s."""
    names, digests = [], []
    for grader in graders:
        name, digest = released.identify(grader.weights)
        names.append(name or str(grader.weights))
        digests.append(digest)
    if blend is not None:  # a released chain by its name too
        name, digest = released.identify(blend.path)
        names.append(name or str(blend.path))
        digests.append(digest)
    return '+'.join(names), '+'.join(digests)


def level_cuts(graders, n_iter):
    """The cut-offs of the level column: a lone net's own (fitted on its validation photographs
    when it was released: `retina.publish.release`) for its centred window, else 0.5, 1.5, 2.5, 3.5
    (several nets averaged, or TTA, whose scores sit higher than the centred window's)."""
    return checkpoint.level_cuts([g.loaded for g in graders], n_iter)



@dataclasses.dataclass
class NetOutput:
    """One net on a batch: score per photo and, where asked, TTA feature statistics and maps."""
    scores: np.ndarray
    features: dict = dataclasses.field(default_factory=dict)  # (n_iter, skip) -> (mean, std)
    maps: torch.Tensor = None
    map_predictions: torch.Tensor = None  # the net's output on the centred window the maps are of
    unlike: np.ndarray = None  # per photo: beyond the training photographs' feature distance
    resaved: np.ndarray = None  # per photo: the centred score of its mildly re-encoded copy


def passes(grader, images, augmentations, precision='fp32'):
    """Outputs and features of `images` (N, 3, S, S) uint8 under each parameter set
    (`scoring.augmentations`; None: the centred window), as numpy arrays, through
    `scoring.tta`; the net under bf16 autocast with `precision` 'bf16' (a blend's features, as
    transform.py computed them)."""
    outputs, features = [], []
    with torch.no_grad():
        for scored in scoring.tta(grader.net, images, grader.spec, augmentations, precision):
            outputs.append(scored.scores.cpu().numpy())
            features.append(scored.features.double().cpu().numpy())
    return outputs, features


def heat_maps(grader, images, method, layer=None):
    """((N, h', w') maps of `method` (retina.heatmaps.methods.METHODS) at conv `layer` [default:
    the last] on the centred window, fp32, and the predictions (N,) they explain): the function
    ram.py draws with, on the same network input."""
    from retina.heatmaps import methods
    x = scoring.prepare(images, grader.spec, precision='fp32')
    maps, predictions = methods.compute_maps(method, grader.net, x, layer=layer)
    return maps.cpu(), predictions.cpu()


def score_batch(grader, photos, n_iter, feature_sets=(), map_method=None,
                feature_precision='fp32', map_layer=None):
    """`NetOutput` of `grader` for `photos`: the score averaged over `n_iter` augmentations,
    the mean/std features of each (n_iter, skip, sequence) in `feature_sets` (as
    transform.py saves them), the heat maps of `map_method` at `map_layer` on the centred window
    (`heat_maps`) if given."""
    device = next(grader.net.parameters()).device
    key = (grader.crop_size, grader.preprocessing)
    # each image converted here as the net's training images were stored (convert.py's JPEG);
    # a photograph that arrived converted is taken as it is stored
    def stored(photo, image):
        return image if photo.already else as_stored(image, grader.spec.encoding)

    images = scoring.as_batch([stored(p, p.converted[key]) for p in photos], device)
    result = NetOutput(scores=None)
    outputs, score_features = passes(grader, images,
                                     scoring.augmentations(grader.config, n_iter))
    result.scores = np.mean(outputs, axis=0)
    if all(key in p.resaved for p in photos):
        copies = scoring.as_batch([stored(p, p.resaved[key]) for p in photos], device)
        result.resaved = passes(grader, copies, [None])[0][0]
    if grader.feature_stats is not None:  # on the centred window, as they were fitted
        centred = score_features[0] if n_iter == 1 else passes(grader, images, [None])[1][0]
        stats = grader.feature_stats
        result.unlike = stats.distances(centred) > stats.threshold
    if map_method:
        result.maps, result.map_predictions = heat_maps(grader, images, map_method, map_layer)
    for tta in feature_sets:
        iterations, skip, sequence = tta
        same_passes = (iterations, skip) == (n_iter, 0) and (n_iter == 1 or sequence == 'scrambled')
        features = score_features if same_passes and feature_precision == 'fp32' else \
            passes(grader, images, scoring.augmentations(grader.config, *tta),
                   precision=feature_precision)[1]
        stack = np.stack(features)
        mean, std = mean_and_std(stack.sum(axis=0), (stack ** 2).sum(axis=0), len(stack))
        result.features[tta] = (mean.astype(np.float32), std.astype(np.float32))
    return result



# --- a blend fitted by blend.py --------------------------------------------------------------

class LoadedBlend:
    """A blend saved by blend.py --predict, tied to the graders that compute its features."""

    def __init__(self, path):
        from retina.blend import fitted as fitted_blend
        self.path = Path(path)
        self.state = fitted_blend.load(path)
        self.thresholds = tuple(self.state['thresholds'])
        self.per_patient = self.state['per_patient']
        # The arithmetic transform.py computed the blend's features in (fp32 before it said)
        self.precision = ('bf16' if any(e.get('precision') == 'bf16'
                                        for e in fitted_blend.entries(self.state)) else 'fp32')
        self._grader_of = {}

    def nets(self):
        """(config name, weights path) of every net the blend's features came from."""
        from retina.blend import fitted as fitted_blend
        entries = fitted_blend.entries(self.state)
        return list(dict.fromkeys((e['cnf'], e['weights']) for e in entries))

    def feature_sets(self, graders):
        """{id(grader): [(n_iter, skip, sequence), ...]}: the TTA runs each grader must make for the
        blend; every feature file needs a grader of its config with the same weights."""
        from retina.blend import fitted as fitted_blend
        wanted = {}
        for index, entry in enumerate(fitted_blend.entries(self.state)):
            if entry['cnf'] is None:
                raise UserError(f'{self.path}: fitted on {entry["file"]}, which is not named '
                                f'like a transform.py feature file (CNF_train_mean_iter_N_skip_'
                                f'K.npy), so its features cannot be computed for new '
                                f'photographs; blend the files transform.py wrote')
            same_config = [g for g in graders if g.config.name == entry['cnf']]
            matching = [g for g in same_config if entry['fingerprint'] in (None, g.fingerprint)]
            if not matching:
                given = (f'the --weights_from given for {entry["cnf"]} are other weights'
                         if same_config else f'no --cnf {entry["cnf"]} was given')
                raise UserError(f'{self.path}: fitted on {entry["file"]}, features of '
                                f'{entry["cnf"]} with {entry["weights"] or "unrecorded weights"}, '
                                f'but {given}; pass --cnf {entry["cnf"]} --weights_from '
                                f'{entry["weights"] or "WEIGHTS"}')
            grader = matching[0]
            self._grader_of[index] = grader
            tta = fitted_blend.tta_of(entry)
            wanted.setdefault(id(grader), [])
            if tta not in wanted[id(grader)]:
                wanted[id(grader)].append(tta)
        return wanted

    def predict(self, names, per_photo_features, graders, without=()):
        """The blend's score per photograph (rows of `names`, features from `grade`); the
        photographs named in `without` never feed their partner eye's blend."""
        from retina.blend import fitted as fitted_blend
        entries = fitted_blend.entries(self.state)
        position = {id(entry): index for index, entry in enumerate(entries)}

        def features_of(entry):
            grader = self._grader_of[position[id(entry)]]
            key = (id(grader), fitted_blend.tta_of(entry))
            stat = 0 if entry['stat'] == 'mean' else 1
            return np.stack([photo[key][stat] for photo in per_photo_features])

        return fitted_blend.predict(self.state, features_of, names, without)
