"""Released models (models/): the shipped files themselves, and the release path end to end on
synthetic photographs (retina.publish.release, predict.py's default, --weights_from NAME, checksums)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO, one_line_error, run_script
from retina.core import paths
from retina.core.metrics import FIXED_CUTS, to_levels
from retina.data.labels import held_out
from retina.model import checkpoint, released

SHIPPED = released.index(released.MODELS_DIR)


def run_release(*args, cwd):
    """python -m retina.release ARGS in `cwd`."""
    return subprocess.run([sys.executable, '-m', 'retina.release', *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_the_repository_ships_a_default_model():
    assert SHIPPED['default'] in SHIPPED['models'], SHIPPED
    # The budget of a clone: five nets (the two of the multi-source chain among them, 3 and
    # 12 MB) and a blend; a sixth 256-px net would need one to go.
    assert sum(f.stat().st_size for f in released.MODELS_DIR.iterdir()) < 50e6


@pytest.mark.parametrize('name', sorted(SHIPPED['models']))
def test_every_released_file_passes_its_checksum_and_grades_a_photo(name, synthetic_source,
                                                                     tmp_path):
    entry = SHIPPED['models'][name]
    path = released.verified(name, released.MODELS_DIR)
    env = {released.MODELS_DIR_VARIABLE: str(released.MODELS_DIR)}
    photo = sorted((synthetic_source / 'train').iterdir())[0]
    if 'nets' in entry:  # a chain: its card, and its blend grades over its nets
        card = (released.MODELS_DIR / entry['card']).read_text()
        assert entry['sha256'] in card and 'Not a medical device' in card
        result = run_script('predict.py', photo, '--blend', name, '--json', '--no_progress',
                            '--grade_anyway', cwd=tmp_path, env=env)
        graded = json.loads(result.stdout)
        assert [n['model'] for n in graded['nets']] == entry['nets']
        assert graded['images'][0]['level'] in range(5)
        return
    state = checkpoint.load(path)
    assert state['config_name'] == entry['config']
    assert state['config']['cnf'].get('hold_out'), 'card figures need a held-out test split'
    assert 'optimizer' not in state or state['optimizer'] is None
    card = (released.MODELS_DIR / entry['card']).read_text()
    assert entry['sha256'] in card and 'Not a medical device' in card
    # how its training images were stored: the checkpoint's own record, or (written before
    # checkpoints kept one) its index entry's, for predict.py to repeat
    assert entry['encoding'] == state.get('encoding', entry['encoding']) == 'jpeg97'
    assert checkpoint.load_net(entry['config'], name).spec.encoding == 'jpeg97'
    # --grade_anyway: the file grades (a synthetic photograph may be called ungradable)
    result = run_script('predict.py', photo, '--weights_from', name, '--json', '--no_progress',
                        '--grade_anyway', cwd=tmp_path, env=env)
    graded = json.loads(result.stdout)
    assert graded['nets'][0]['config'] == entry['config']
    assert graded['images'][0]['level'] in range(5)


@pytest.mark.parametrize('name', sorted(SHIPPED['models'])[:1])
def test_fine_tuning_from_a_released_model_is_one_command(name, workdir):
    result = run_script('train_nn.py', '--cnf', SHIPPED['models'][name]['config'], '--weights_from',
                        name, '--train_dir', 'data/train_tiny', '--max_epochs', '1',
                        '--no_progress', cwd=workdir)
    assert 'skipped' not in result.stdout  # every layer came from the released weights
    assert 'loaded' in result.stdout and 'epoch    1' in result.stdout


@pytest.fixture(scope='module')
def release(tmp_path_factory, converted_workdir):
    """A 1-epoch net trained with --hold_out on the synthetic photos, released as tiny-128
    into a models folder of its own; (workdir, models folder, the release's output)."""
    work = tmp_path_factory.mktemp('release')
    shutil.copytree(converted_workdir / 'data', work / 'data',
                    ignore=shutil.ignore_patterns('cache'))
    run_script('train_nn.py', '--cnf', 'c_128_5x5_32_ram', '--max_epochs', '1', '--hold_out',
               '0.3', '--no_progress', cwd=work)
    models = work / 'shipped'
    result = run_release('tiny-128', '--weights', paths.best_kappa_weights('c_128_5x5_32_ram'),
                         '--photos', 'data/train_tiny', '--labels', 'data/trainLabels.csv',
                         '--models_dir', models, '--default', '--summary', 'a test net',
                         cwd=work)
    assert result.returncode == 0, result.stderr
    return work, models, result


def test_release_writes_the_checkpoint_its_checksum_and_a_card_of_test_split_figures(release):
    work, models, _ = release
    index = json.loads((models / 'index.json').read_text())
    entry = index['models']['tiny-128']
    assert index['default'] == 'tiny-128' and entry['config'] == 'c_128_5x5_32_ram'
    assert released.sha256_of(models / entry['file']) == entry['sha256']
    state = checkpoint.load(models / entry['file'])
    trained = checkpoint.load(work / paths.best_kappa_weights('c_128_5x5_32_ram'))
    for key, value in trained['model'].items():
        assert torch.equal(state['model'][key], value), key
    # trained on convert.py's JPEGs: the checkpoint and the index say so
    assert state['encoding'] == trained['encoding'] == entry['encoding'] == 'jpeg97'
    card = (models / entry['card']).read_text()
    names = [p.stem for p in (work / 'data' / 'train_tiny').iterdir() if p.suffix == '.jpeg']
    held = [n for n in names if held_out(n, 0.3)]
    assert f'| test split (train_tiny) | {len(held)} (' in card
    assert 'a test net' in card and '--hold_out 0.3' in card


def test_predict_grades_with_the_released_default_and_says_so(release, synthetic_source,
                                                              tmp_path):
    _, models, _ = release
    env = {released.MODELS_DIR_VARIABLE: str(models)}
    photos = sorted((synthetic_source / 'train').iterdir())[:2]
    result = run_script('predict.py', *photos, '--no_progress', cwd=tmp_path, env=env)
    assert 'grading with the released model tiny-128' in result.stderr
    assert len(result.stdout.strip().splitlines()) == 3
    by_name = run_script('predict.py', *photos, '--weights_from', 'tiny-128', '--no_progress',
                         cwd=tmp_path, env=env)
    assert by_name.stdout == result.stdout and 'released model' not in by_name.stderr
    # Its level: the score cut at the net's own cut-offs (fitted on its validation photographs)
    # for the centred window, the fixed ones under TTA.
    cuts = checkpoint.load(models / 'tiny-128.pt')['thresholds']
    assert len(cuts) == 4 and list(cuts) == sorted(cuts)
    import csv
    import io
    for args, expected in (((), cuts), (('--n_iter', '2'), FIXED_CUTS)):
        graded = run_script('predict.py', *photos, *args, '--no_progress', cwd=tmp_path, env=env)
        for row in csv.DictReader(io.StringIO(graded.stdout)):
            if row['gradable'] == 'yes':
                assert int(row['level']) == to_levels([float(row['mean'])], expected)[0]
    # transform.py takes the short name too (ram.py and the export load through the same
    # checkpoint.load).
    work, _, _ = release
    features = run_script('transform.py', '--cnf', 'c_128_5x5_32_ram', '--weights_from',
                          'tiny-128', '--test_dir', work / 'data' / 'train_tiny', '--n_iter', '1',
                          '--no_progress', cwd=tmp_path, env=env)
    assert 'test:' in features.stdout


def test_a_damaged_release_is_a_one_line_error(release, synthetic_source, tmp_path):
    _, models, _ = release
    broken = tmp_path / 'broken'
    shutil.copytree(models, broken)
    env = {released.MODELS_DIR_VARIABLE: str(broken)}
    photo = sorted((synthetic_source / 'train').iterdir())[0]
    weights = broken / 'tiny-128.pt'
    content = bytearray(weights.read_bytes())
    content[-100] ^= 0xFF
    weights.write_bytes(bytes(content))
    one_line_error(run_script('predict.py', photo, cwd=tmp_path, env=env, check=False),
                   'tiny-128.pt', 'fails its checksum', 'git checkout')
    (broken / 'tiny-128.md').unlink()
    one_line_error(run_script('predict.py', photo, '--weights_from', 'tiny-128', cwd=tmp_path,
                              env=env, check=False), 'tiny-128.md', 'card', 'missing')
    (broken / 'index.json').write_text('{"models": [}')
    one_line_error(run_script('predict.py', photo, cwd=tmp_path, env=env, check=False),
                   'index.json', 'not a released-models index')


def test_release_refuses_a_net_trained_without_a_held_out_split(workdir):
    run_script('train_nn.py', '--cnf', 'c_128_5x5_32_ram', '--max_epochs', '1', '--no_progress',
               cwd=workdir)
    result = run_release('x', '--weights', paths.best_kappa_weights('c_128_5x5_32_ram'),
                         '--photos', 'data/train_tiny', '--labels', 'data/trainLabels.csv',
                         '--models_dir', workdir / 'm', cwd=workdir)
    one_line_error(result, 'trained without --hold_out')
    assert not (workdir / 'm').exists()


def released_copy(release, tmp_path):
    """The test release's models folder copied (its files may be damaged or written over), and
    the environment that makes it the released models' folder."""
    _, models, _ = release
    copy = tmp_path / 'shipped'
    shutil.copytree(models, copy)
    return copy, {released.MODELS_DIR_VARIABLE: str(copy)}


def test_no_output_lands_on_a_released_model_or_in_its_folder(release, synthetic_source,
                                                               tmp_path):
    models, env = released_copy(release, tmp_path)
    photo = sorted((synthetic_source / 'train').iterdir())[0]
    weights = models / 'tiny-128.pt'
    before = {p: p.read_bytes() for p in models.iterdir()}
    cases = [
        ('predict.py', photo, '--weights_from', 'tiny-128', '--output', weights),
        ('predict.py', photo, '--weights_from', weights, '--output', weights),
        ('predict.py', photo, '--output', weights),  # the default net is the released one
        ('predict.py', photo, '--output', models / 'grades.csv'),
        ('predict.py', photo, '--output', REPO / 'models' / 'grades.csv'),
        ('predict.py', photo, '--heatmap', models / 'maps'),
        ('ram.py', '--weights_from', 'tiny-128', '--images', photo.parent, '--output_dir',
         models),
    ]
    for script, *args in cases:
        one_line_error(run_script(script, *args, cwd=tmp_path, env=env, check=False),
                       "the released models' folder")
    result = subprocess.run([sys.executable, '-m', 'retina.export', '--weights_from', 'tiny-128',
                             '--output', weights, '--no_check'], cwd=tmp_path,
                            capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), **env))
    one_line_error(result, "the released models' folder")
    assert {p: p.read_bytes() for p in models.iterdir()} == before
    assert not (REPO / 'models' / 'grades.csv').exists()


def test_a_missing_index_says_the_released_models_are_missing(release, synthetic_source,
                                                             tmp_path):
    models, env = released_copy(release, tmp_path)
    (models / 'index.json').unlink()
    photo = sorted((synthetic_source / 'train').iterdir())[0]
    for args in ((), ('--weights_from', 'tiny-128')):
        line = one_line_error(run_script('predict.py', photo, *args, cwd=tmp_path, env=env,
                                         check=False), 'index.json is missing',
                              'released models', 'git checkout --')
        assert 'train first' not in line
    # Weights given as a path that is not there are still 'not found; train first'.
    one_line_error(run_script('predict.py', photo, '--weights_from', 'weights/x/weights.pt',
                              cwd=tmp_path, env=env, check=False), 'not found')


def test_a_released_name_needs_no_cnf_in_any_script(release, tmp_path):
    work, models, _ = release
    env = {released.MODELS_DIR_VARIABLE: str(models)}
    images = work / 'data' / 'train_tiny'
    maps = run_script('ram.py', '--weights_from', 'tiny-128', '--images', images, '--limit', '2',
                      '--output_dir', tmp_path / 'maps', '--no_progress', cwd=tmp_path, env=env)
    assert 'wrote 2 heat map(s)' in maps.stdout
    features = run_script('transform.py', '--weights_from', 'tiny-128', '--test_dir', images,
                          '--no_progress', cwd=tmp_path, env=env)
    assert 'test:' in features.stdout and 'c_128_5x5_32_ram_test_mean' in features.stdout
    result = subprocess.run([sys.executable, '-m', 'retina.export', '--weights_from', 'tiny-128',
                             '--output', 'net.onnx', '--no_check'], cwd=tmp_path,
                            capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), **env))
    assert result.returncode == 0 and (tmp_path / 'net.onnx').is_file(), result.stderr
    one_line_error(run_script('ram.py', '--images', images, cwd=tmp_path, env=env, check=False),
                   '--weights_from', '--cnf')


def test_every_script_cuts_a_net_at_its_own_cut_offs_and_outputs_name_it(release,
                                                                         synthetic_source,
                                                                         tmp_path):
    pytest.importorskip('onnxruntime')
    import csv
    import io
    import onnx
    work = release[0]
    models, env = released_copy(release, tmp_path)
    cuts = [0.3, 1.2, 2.7, 3.1]  # cut-offs of its own, unlike the fixed ones, whatever it fitted
    state = torch.load(models / 'tiny-128.pt', weights_only=True)
    torch.save(dict(state, thresholds=cuts), models / 'tiny-128.pt')
    index = json.loads((models / 'index.json').read_text())
    index['models']['tiny-128']['sha256'] = released.sha256_of(models / 'tiny-128.pt')
    (models / 'index.json').write_text(json.dumps(index))
    shown = ' '.join(f'{c:.3f}' for c in cuts)
    maps = run_script('ram.py', '--weights_from', 'tiny-128', '--images',
                      work / 'data' / 'train_tiny', '--limit', '2', '--output_dir',
                      tmp_path / 'maps', '--no_progress', cwd=tmp_path, env=env)
    assert f"levels: the score cut at {shown} (the net's own)" in maps.stdout, maps.stdout
    subprocess.run([sys.executable, '-m', 'retina.export', '--weights_from', 'tiny-128',
                    '--output', 'net.onnx', '--no_check'], cwd=tmp_path, check=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO), **env))
    meta = {p.key: p.value for p in onnx.load(tmp_path / 'net.onnx').metadata_props}
    assert [float(c) for c in meta['retina.level_cuts'].split(',')] == pytest.approx(cuts)
    photos = sorted((synthetic_source / 'train').iterdir())[:3]
    graded = run_script('predict.py', *photos, '--weights_from', 'tiny-128', '--no_progress',
                        cwd=tmp_path, env=env)
    rows = list(csv.DictReader(io.StringIO(graded.stdout)))
    for row in rows:
        if row['gradable'] == 'yes':
            assert int(row['level']) == to_levels([float(row['mean'])], cuts)[0]
    entry = json.loads((models / 'index.json').read_text())['models']['tiny-128']
    assert {(r['model'], r['model_sha256']) for r in rows} == {('tiny-128', entry['sha256'])}


def test_refitting_a_released_models_feature_statistics_keeps_it_whole(release, tmp_path):
    """python -m retina.release NAME --refit_feature_stats: one mean per level, the weights
    untouched, and the new sha256 in the index and the card (the file still loads by name)."""
    work, _, _ = release
    models, _ = released_copy(release, tmp_path)
    before = checkpoint.load(models / 'tiny-128.pt')
    old = released.sha256_of(models / 'tiny-128.pt')
    result = run_release('tiny-128', '--refit_feature_stats', '--photos', 'data/train_tiny',
                         '--labels', 'data/trainLabels.csv', '--models_dir', models, cwd=work)
    assert result.returncode == 0, result.stderr
    after = checkpoint.load(released.verified('tiny-128', models))  # the checksum holds
    new = released.sha256_of(models / 'tiny-128.pt')
    assert new != old and new in (models / 'tiny-128.md').read_text()
    assert old not in (models / 'tiny-128.md').read_text()
    assert after['feature_stats']['mean'].ndim == 2  # one row per level
    for key, value in before['model'].items():
        assert torch.equal(after['model'][key], value), key
    assert after.get('thresholds') == before.get('thresholds')


# ---------------------------------------------------------------- a released chain

@pytest.fixture(scope='module')
def chain(release, synthetic_source, tmp_path_factory):
    """tiny-128's 2-view TTA features blended per patient by blend.py's run_blend, released as
    the chain tiny-chain (the default) into a copy of the models folder; (workdir, models
    folder, the blend's submission {image: (level, score)})."""
    from retina.blend.blending import run_blend
    from retina.features.extract import extract_features
    from retina.model import config as config_module
    work, models, _ = release
    chain_work = tmp_path_factory.mktemp('chain')
    shutil.copytree(work / 'data', chain_work / 'data', ignore=shutil.ignore_patterns('cache'))
    shipped = chain_work / 'shipped'
    shutil.copytree(models, shipped)
    data, files = chain_work / 'data', []
    # stored as the net's training images were (convert.py's JPEG, which predict.py repeats in
    # memory), so that the submission's features are those predict.py computes from the photos
    from retina.data.conversion import convert_folder
    convert_folder(synthetic_source / 'test', data / 'test_stored', 128, 'jpeg', n_proc=1,
                   progress=False)
    config = config_module.load('c_128_5x5_32_ram')
    loaded = checkpoint.load_net(config, shipped / 'tiny-128.pt')
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(chain_work)
        for split, folder in (('train', data / 'train_tiny'), ('test', data / 'test_stored')):
            made = extract_features(config, loaded, folder, split, n_iter=2, progress=False,
                                    echo=lambda *a: None, weights=str(shipped / 'tiny-128.pt'))
            files += [made['mean'], made['std']] if split == 'train' else []
        result = run_blend({'features': files}, labels_file=data / 'trainLabels.csv',
                           per_patient=True, predict=True, test_dir=data / 'test_stored',
                           optimize_thresholds=True, output=data / 'sub.csv', scores=True,
                           pictures=False, echo=lambda *a: None)
    (chain_work / 'figures.md').write_text('| test split | 1.0 |\n')
    made = run_release('tiny-chain', '--chain', 'tiny-128', '--blend',
                       result.submission.fitted_blend, '--figures', 'figures.md', '--models_dir',
                       shipped, '--default', '--summary', 'a test chain', cwd=chain_work)
    assert made.returncode == 0, made.stderr
    lines = (data / 'sub.csv').read_text().split()[1:]
    submission = {n: (int(level), float(score))
                  for n, level, score in (line.split(',') for line in lines)}
    return chain_work, shipped, submission


def test_release_writes_a_chain_of_released_nets_with_its_blend_and_card(chain):
    work, models, _ = chain
    index = json.loads((models / 'index.json').read_text())
    entry = index['models']['tiny-chain']
    assert index['default'] == 'tiny-chain'
    assert entry['nets'] == ['tiny-128'] and entry['fast'] == 'tiny-128'
    assert released.sha256_of(models / entry['file']) == entry['sha256']
    card = (models / entry['card']).read_text()
    assert 'a test chain' in card and '| test split | 1.0 |' in card and '2 views' in card
    assert 'per net, the mean and standard deviation of its last conv features' in card
    assert released.chain('tiny-chain', models)[1] == [('c_128_5x5_32_ram',
                                                        models / 'tiny-128.pt')]
    # a net that is not released, or a blend of other weights, is refused in one line
    other = run_release('bad', '--chain', 'nothing-here', '--blend', models / 'tiny-chain.pt',
                        '--models_dir', models, cwd=work)
    one_line_error(other, '--chain nothing-here', 'not a released net')
    from retina.core.errors import UserError
    from retina.publish.chain import release_chain
    state = torch.load(models / 'tiny-chain.pt', weights_only=True)
    state['runs'][0]['files'][0]['fingerprint'] = '0' * 16
    torch.save(state, work / 'other_blend.pt')
    with pytest.raises(UserError, match='none of the released nets tiny-128'):
        release_chain('bad', ['tiny-128'], None, work / 'other_blend.pt', None, '', False, models)
    assert 'bad' not in released.index(models)['models']
    # a blend of the mean features alone says so on its card
    state = torch.load(models / 'tiny-chain.pt', weights_only=True)
    state['runs'][0]['files'] = [f for f in state['runs'][0]['files'] if f['stat'] == 'mean']
    torch.save(state, work / 'mean_blend.pt')
    release_chain('tiny-mean', ['tiny-128'], None, work / 'mean_blend.pt', None, '', False, models)
    card = (models / 'tiny-mean.md').read_text()
    assert 'per net, the mean alone of its last conv features over 2 views' in card
    assert released.index(models)['default'] == 'tiny-chain'


def test_predict_grades_with_a_default_chain_per_patient_and_fast_with_its_net(
        chain, synthetic_source, tmp_path):
    work, models, submission = chain
    env = {released.MODELS_DIR_VARIABLE: str(models)}
    names = sorted(submission)
    pair = next(n for n in names if n.endswith('_left') and n[:-5] + '_right' in submission)
    photos = [p for p in sorted((synthetic_source / 'test').iterdir())
              if p.stem in (pair, pair[:-5] + '_right')]
    assert len(photos) == 2
    by_default = run_script('predict.py', *photos, '--json', '--no_progress', '--heatmap',
                            tmp_path / 'maps', '--batch_size', '1', cwd=tmp_path, env=env)
    assert 'grading with the released chain tiny-chain' in by_default.stderr
    graded = json.loads(by_default.stdout)
    assert graded['model'] == 'tiny-128+tiny-chain'
    for row in graded['images']:  # the submission blend.py wrote for the same photographs
        level, score = submission[row['image']]
        assert abs(row['blend'] - score) < 2e-4 and row['level'] == level, row
        # its map says the same level (both eyes share a batch, even of one)
        with Image.open(tmp_path / 'maps' / f'{row["image"]}_ram_c_128_5x5_32_ram.png') as m:
            assert m.text['retina.caption'].startswith(
                f'{row["image"]}: level {level} (blend score {row["blend"]:.2f})')
    named = run_script('predict.py', *photos, '--blend', 'tiny-chain', '--json', '--no_progress',
                       cwd=tmp_path, env=env)
    assert named.stdout == by_default.stdout
    lone = run_script('predict.py', photos[0], '--json', '--no_progress', cwd=tmp_path, env=env)
    assert 'blended alone' in lone.stderr
    assert json.loads(lone.stdout)['images'][0]['level'] is not None
    fast = run_script('predict.py', *photos, '--fast', '--no_progress', cwd=tmp_path, env=env)
    net = run_script('predict.py', *photos, '--weights_from', 'tiny-128', '--no_progress',
                     cwd=tmp_path, env=env)
    assert "tiny-chain's fast net tiny-128" in fast.stderr and fast.stdout == net.stdout
    assert 'blend' not in fast.stdout.splitlines()[0]
    not_a_net = run_script('predict.py', *photos, '--weights_from', 'tiny-chain', cwd=tmp_path,
                           env=env, check=False)
    one_line_error(not_a_net, 'tiny-chain is a released chain', '--blend tiny-chain')
    # a damaged chain file is a one-line error naming it
    damaged = tmp_path / 'damaged'
    shutil.copytree(models, damaged)
    (damaged / 'tiny-chain.pt').write_bytes(b'not a blend')
    broken = run_script('predict.py', *photos, cwd=tmp_path, check=False,
                        env={released.MODELS_DIR_VARIABLE: str(damaged)})
    one_line_error(broken, 'tiny-chain.pt', 'fails its checksum')


def test_a_card_names_the_sources_of_its_photographs(tmp_path):
    from retina.publish.release import data_words
    labels = tmp_path / 'labels.csv'
    labels.write_text('image,level,patient,eye,source\n1_left,0,1,left,eyepacs256\n'
                      'odir2_left,1,odir2,left,odir\nodir2_right,0,odir2,right,odir\n')
    programme, data, terms = data_words(labels)
    assert programme == '2 sources (eyepacs256, odir)'
    assert data == 'photographs of 2 sources (eyepacs256 1, odir 2)' and 'odir' in terms
    labels.write_text('image,level\n1_left,0\n')
    assert data_words(labels) == ('one screening programme (EyePACS)', 'EyePACS photographs', '')
