"""retina.model.scoring and the input spec it reads: the spec comes from the checkpoint alone,
the one scoring path gives what each stage's own loop gave before, and nothing is guessed."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import as_loaded
from retina.core import paths
from retina.core.errors import UserError
from retina.core.metrics import FIXED_CUTS
from retina.model import checkpoint, scoring
from retina.model import config as config_module
from retina.model.augment import KAGGLE, broadcast_params, constants_for, prepare_batch, tta_params
from retina.model.checkpoint import InputSpec

CONFIG = 'c_128_5x5_32_ram'
OWN = dict(mean=[100.0, 80.0, 60.0], std=[50.0, 40.0, 20.0], colour_u=np.eye(3).tolist(),
           colour_ev=[2.0, 1.0, 0.5])
CUTS = (0.25, 1.25, 2.0, 3.75)


def quick_init(tensor, gain=1.0):
    with torch.no_grad():
        return tensor.normal_(0, gain / tensor[0].numel() ** 0.5)


@pytest.fixture
def own_net(tmp_path, monkeypatch):
    """A checkpoint of CONFIG trained (untrained, here) on its own data's constants, with the
    look local_contrast and a released net's cut-offs; the file's path."""
    monkeypatch.setattr(torch.nn.init, 'orthogonal_', quick_init)
    config = config_module.load(CONFIG)
    config.cnf.update(OWN)
    torch.manual_seed(0)
    path = tmp_path / 'own.pt'
    checkpoint.save(path, config.build_net(), config, epoch=3, preprocessing='local_contrast',
                    thresholds=list(CUTS))
    return path


def images(count=3, side=128, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(
        0, 256, (count, 3, side, side), dtype=np.uint8))


# --- the spec -----------------------------------------------------------------------------

def test_the_spec_round_trips_through_a_checkpoint(own_net):
    loaded = checkpoint.load_net(CONFIG, own_net)
    spec = loaded.spec
    assert spec == InputSpec(window=(112, 112), size=128, preprocessing='local_contrast',
                             constants=constants_for(OWN), precision='fp32', cuts=CUTS)
    assert spec.constants != KAGGLE
    # what the stages read off the loaded net is the spec's
    assert (loaded.input_size, loaded.preprocessing, loaded.constants) == \
        (spec.window, spec.preprocessing, spec.constants)
    assert checkpoint.level_cuts([loaded]) == CUTS
    assert checkpoint.level_cuts([loaded], n_iter=10) == FIXED_CUTS  # TTA: the fixed cuts
    assert checkpoint.level_cuts([loaded, loaded]) == FIXED_CUTS
    # as plain values (JSON) and back
    assert InputSpec.from_dict(json.loads(json.dumps(spec.as_dict()))) == spec
    # the config module edited after training: the checkpoint's constants still hold
    edited = config_module.load(CONFIG)
    edited.cnf.update(mean=[1.0, 2.0, 3.0])
    assert checkpoint.load_net(edited, own_net).spec == spec


def test_a_spec_without_cut_offs_or_look_is_the_plain_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.init, 'orthogonal_', quick_init)
    config = config_module.load(CONFIG)
    checkpoint.save(tmp_path / 'plain.pt', config.build_net(), config, epoch=0)
    spec = checkpoint.load_net(CONFIG, tmp_path / 'plain.pt').spec
    assert (spec.preprocessing, spec.cuts, spec.constants) == ('none', None, KAGGLE)
    assert spec == InputSpec.of_config(config)


def test_weights_are_resolved_from_a_file_a_run_folder_or_the_config(own_net, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoint.resolve_weights(own_net) == own_net
    run = tmp_path / 'weights' / CONFIG
    run.mkdir(parents=True)
    assert checkpoint.resolve_weights(run) == run / 'weights.pt'
    assert checkpoint.resolve_weights(None, CONFIG) == \
        paths.best_kappa_weights(CONFIG)
    with pytest.raises(UserError, match='no weights named'):
        checkpoint.resolve_weights(None, None)
    (run / 'weights.pt').write_bytes(own_net.read_bytes())
    # load_net takes the same names: a run folder, or nothing (the config's best weights)
    assert checkpoint.load_net(CONFIG, run).weights == run / 'weights.pt'
    assert checkpoint.load_net(CONFIG).weights == paths.best_kappa_weights(CONFIG)


def test_no_spec_no_constants_is_a_clear_error():
    net = config_module.load(CONFIG).build_net().eval()
    with pytest.raises(ValueError, match='no input spec'):
        scoring.prepare(images(), None)
    with pytest.raises(ValueError, match='no input spec'):
        scoring.score(net, images(), None)
    with pytest.raises(ValueError, match='pixel constants'):
        InputSpec(window=(112, 112), size=128, preprocessing='none', constants=None)
    with pytest.raises(ValueError, match='precision'):
        InputSpec(window=(112, 112), size=128, preprocessing='none', constants=KAGGLE,
                  precision='fp16')
    from retina.publish.export import ExportedNet
    with pytest.raises(ValueError, match='input spec'):
        ExportedNet(net, None, with_ram=False)


# --- the scores: what each stage's own loop computed before --------------------------------

def old_passes(net, batch, window, constants, augmentations, precision='fp32'):
    """predict.py's loop as it was (retina/grade/predict.py `_passes`, before scoring.py)."""
    outputs, features = [], []
    device = next(net.parameters()).device
    with torch.no_grad():
        for params in augmentations:
            x = prepare_batch(batch, window,
                              broadcast_params(params, len(batch), device) if params else None,
                              constants=constants,
                              dtype=torch.bfloat16 if precision == 'bf16' else torch.float32)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
                out, feat = net(x, return_features=True)
            outputs.append(out.float().squeeze(1).cpu().numpy())
            features.append(feat.double().cpu().numpy())
    return outputs, features


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_centred_and_tta_scores_are_those_of_the_old_loops(own_net, precision):
    loaded = checkpoint.load_net(CONFIG, own_net)
    batch = images()
    cnf = loaded.config.cnf
    for n_iter in (1, 4):
        old_params = [None] if n_iter == 1 else tta_params(n_iter, 0, cnf['aug_params'],
                                                           cnf['sigma'])
        params = scoring.augmentations(loaded.config, n_iter)
        assert params == old_params
        expected = old_passes(loaded.net, batch, loaded.input_size, constants_for(OWN),
                              old_params, precision)
        with torch.no_grad():
            got = list(scoring.tta(loaded.net, batch, loaded.spec, params, precision))
        assert len(got) == n_iter
        for (scores, features), old_scores, old_features in zip(got, *expected):
            np.testing.assert_array_equal(scores.numpy(), old_scores)
            np.testing.assert_array_equal(features.double().numpy(), old_features)


def test_inference_scores_the_centred_window_of_the_spec(own_net):
    """Validation and the release (inference.predict) as transform.py's first iteration and
    predict.py's centred window: one path."""
    from retina.core.runtime import Runtime
    from retina.model.inference import predict
    loaded = checkpoint.load_net(CONFIG, own_net)
    loaded.net.to(memory_format=torch.channels_last)
    batch = images(5)
    runtime = Runtime(torch.device('cpu'))
    got = predict(loaded.net, batch.numpy(), np.arange(5)[::-1], loaded.spec, runtime, 2)
    with torch.no_grad():
        x = prepare_batch(batch, (112, 112), constants=constants_for(OWN),
                          memory_format=torch.channels_last)
        expected = loaded.net(x).squeeze(1).numpy()
    np.testing.assert_allclose(got, expected[::-1], rtol=1e-5, atol=1e-6)
    features = predict(loaded.net, batch.numpy(), np.arange(5), loaded.spec, runtime, 5,
                       features=True)
    assert features.shape == (5, loaded.net(x, return_features=True)[1].shape[1])


def test_a_cut_window_is_prepared_as_the_full_image(own_net):
    """ram.py cuts the window first (and shrinks a larger net's for a smaller one); on the
    net's own window it feeds exactly what predict.py's centred window does."""
    from retina.model.augment import centre_crop
    spec = checkpoint.load_net(CONFIG, own_net).spec
    batch = images()
    windows = centre_crop(batch, spec.window).to(torch.uint8)
    torch.testing.assert_close(scoring.prepare_window(windows, spec),
                               scoring.prepare(batch, spec), rtol=0, atol=0)
    larger = centre_crop(images(side=256), (224, 224)).to(torch.uint8)
    assert scoring.prepare_window(larger, spec).shape == (3, 3, 112, 112)


def test_per_image_parameters_and_a_shared_set_are_the_same_augmentation():
    config = config_module.load(CONFIG)
    spec = InputSpec.of_config(config)
    params = scoring.augmentations(config, 3)[2]
    batch = images()
    torch.testing.assert_close(scoring.prepare(batch, spec, params),
                               scoring.prepare(batch, spec, broadcast_params(params, 3)),
                               rtol=0, atol=0)


def test_the_grader_and_the_feature_extraction_use_the_one_loop(own_net, tmp_path):
    """predict.py's passes and transform.py's sums are scoring.tta's features."""
    from retina.grade.grader import load_grader, passes
    grader = load_grader(CONFIG, own_net)
    assert grader.spec == checkpoint.load_net(CONFIG, own_net).spec
    batch = images()
    params = scoring.augmentations(grader.config, 3)
    outputs, features = passes(grader, batch, params)
    with torch.no_grad():
        again = list(scoring.tta(grader.net, batch, grader.spec, params))
    for output, feature, scored in zip(outputs, features, again):
        np.testing.assert_array_equal(output, scored.scores.numpy())
        np.testing.assert_array_equal(feature, scored.features.double().numpy())


def test_as_loaded_nets_carry_a_spec():
    config = config_module.load(CONFIG)
    loaded = as_loaded(config, config.build_net(), preprocessing='local_contrast')
    assert loaded.spec.preprocessing == 'local_contrast' and loaded.spec.window == (112, 112)
    moved = dataclasses.replace(loaded.spec, cuts=CUTS)
    assert checkpoint.level_cuts([dataclasses.replace(loaded, spec=moved)]) == CUTS
