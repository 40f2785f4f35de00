"""python -m retina.datasets: ODIR-5K's keywords mapped to DR levels, from a clone or a bare git
snapshot, names prefixed, exclusions listed; raw EyePACS folders joined without the eyes another
set holds; and the patients of every source kept on one side of the test split."""
import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, one_line_error
from retina.core.paths import patient_and_eye
from retina.data.datasets import keywords, odir_level
from retina.data.labels import held_out, load_labels, split_indices

HEADER = ('ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,'
          'Right-Diagnostic Keywords,N,D,G,C,A,H,M,O')
# (ID, left keywords, right keywords); the expected level or None (excluded) per eye
PATIENTS = [
    (0, 'normal fundus', 'mild nonproliferative retinopathy', 0, 1),
    (1, 'moderate non proliferative retinopathy', 'laser spot，moderate non proliferative retinopathy', 2, 2),
    (2, 'severe nonproliferative retinopathy', 'proliferative diabetic retinopathy', 3, 4),
    (3, 'diabetic retinopathy', 'suspected diabetic retinopathy', None, None),
    (4, 'cataract', 'normal fundus，lens dust', 0, 0),
    (5, 'low image quality，mild nonproliferative retinopathy', 'glaucoma，mild nonproliferative retinopathy', None, 1),
    (6, 'laser spot', 'severe proliferative diabetic retinopathy', None, 4),
]


def fake_odir(root, missing=('0_right.jpg',)):
    """A tiny ODIR-5K clone: full_df.csv (each patient once per photograph, as the real file)
    and preprocessed_images/; `missing` photographs are named in the CSV but absent."""
    images = root / 'preprocessed_images'
    images.mkdir(parents=True)
    lines = [HEADER]
    rng = np.random.default_rng(0)
    for pid, left, right, *_ in PATIENTS:
        row = f'{pid},60,Male,{pid}_left.jpg,{pid}_right.jpg,"{left}","{right}",0,0,0,0,0,0,0,0'
        lines += [row, row]
        for eye in ('left', 'right'):
            if f'{pid}_{eye}.jpg' not in missing:
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    images / f'{pid}_{eye}.jpg')
    (root / 'full_df.csv').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return root


def datasets(*args, cwd, check=True):
    import os
    result = subprocess.run([sys.executable, '-m', 'retina.datasets', *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert not check or result.returncode == 0, result.stderr
    return result


def rows_of(out):
    with open(out / 'trainLabels.csv') as f:
        return {row['image']: row for row in csv.DictReader(f)}


def expected():
    levels = {}
    for pid, _, _, left, right in PATIENTS:
        for eye, level in (('left', left), ('right', right)):
            if level is not None and f'{pid}_{eye}.jpg' != '0_right.jpg':
                levels[f'odir{pid}_{eye}'] = level
    return levels


def test_keyword_mapping():
    assert keywords('laser spot，moderate non proliferative retinopathy') == [
        'laser spot', 'moderate non proliferative retinopathy']
    assert odir_level(['normal fundus']) == (0, None)
    assert odir_level(['mild nonproliferative retinopathy']) == (1, None)
    assert odir_level(['moderate non proliferative retinopathy']) == (2, None)
    assert odir_level(['severe nonproliferative retinopathy']) == (3, None)
    assert odir_level(['proliferative diabetic retinopathy']) == (4, None)
    assert odir_level(['severe proliferative diabetic retinopathy']) == (4, None)
    # several stages: the worst; a stage beside signs of treatment: the stage
    assert odir_level(['mild nonproliferative retinopathy', 'severe nonproliferative retinopathy'])[0] == 3
    assert odir_level(['laser spot', 'moderate non proliferative retinopathy'])[0] == 2
    for unstaged in ('diabetic retinopathy', 'suspected diabetic retinopathy', 'laser spot',
                     'suspected moderate non proliferative retinopathy'):
        level, why = odir_level([unstaged])
        assert level is None and 'without a stage' in why
    level, why = odir_level(['low image quality', 'moderate non proliferative retinopathy'])
    assert level is None and 'unusable' in why
    assert odir_level(['cataract']) == (0, None)
    assert odir_level(['cataract'], 'exclude')[0] is None
    assert odir_level(['normal fundus', 'lens dust'], 'exclude') == (0, None)


def test_odir_from_a_clone_and_a_bare_snapshot(tmp_path):
    clone = fake_odir(tmp_path / 'clone')
    datasets('odir', clone, tmp_path / 'out', '--no_progress', cwd=tmp_path)
    rows = rows_of(tmp_path / 'out')
    assert {name: int(row['level']) for name, row in rows.items()} == expected()
    for name, row in rows.items():
        assert name.startswith('odir') and (row['patient'], row['eye']) == patient_and_eye(name)
        assert row['source'] == 'odir'
        assert (tmp_path / 'out' / 'train' / f'{name}.jpg').read_bytes() == (
            clone / 'preprocessed_images' / f'{name[4:]}.jpg').read_bytes()
    assert sorted(p.stem for p in (tmp_path / 'out' / 'train').iterdir()) == sorted(expected())
    excluded = (tmp_path / 'out' / 'excluded.csv').read_text()
    assert '3_left.jpg,"DR without a stage' in excluded
    assert '0_right.jpg,"photograph not in the snapshot' in excluded
    load_labels(tmp_path / 'out' / 'trainLabels.csv')  # the pipeline reads it

    if shutil.which('git') is None:
        pytest.skip('git is not installed: the bare snapshot is not tested')
    git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-C', str(clone)]
    subprocess.run(['git', 'init', '-q', str(clone)], check=True)
    subprocess.run(git + ['add', '.'], check=True)
    subprocess.run(git + ['commit', '-qm', 'snapshot'], check=True)
    subprocess.run(['git', 'clone', '-q', '--bare', str(clone), str(tmp_path / 'bare')], check=True)
    datasets('odir', tmp_path / 'bare', tmp_path / 'out_bare', '--no_progress', cwd=tmp_path)
    assert rows_of(tmp_path / 'out_bare') == rows


def test_odir_reruns_and_refuses_another_set(tmp_path):
    clone = fake_odir(tmp_path / 'clone')
    datasets('odir', clone, tmp_path / 'out', '--no_progress', cwd=tmp_path)
    again = datasets('odir', clone, tmp_path / 'out', '--no_progress', cwd=tmp_path)
    assert f'{len(expected())} photographs' in again.stdout
    one_line_error(datasets('odir', clone, tmp_path / 'out', '--other_diseases', 'exclude',
                            cwd=tmp_path, check=False), 'holds another data set')
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'mine.txt').write_text('x')
    one_line_error(datasets('odir', clone, tmp_path / 'busy', cwd=tmp_path, check=False),
                   'not empty')
    one_line_error(datasets('odir', tmp_path / 'busy', tmp_path / 'o2', cwd=tmp_path, check=False),
                   'not a clone or snapshot of ODIR-5K')
    excluded = datasets('odir', clone, tmp_path / 'ex', '--other_diseases', 'exclude',
                        '--no_progress', cwd=tmp_path)
    assert 'odir4_left' not in rows_of(tmp_path / 'ex') and 'odir4_right' in rows_of(tmp_path / 'ex')
    assert 'other diseases' in excluded.stdout


def test_eyepacs_folder_without_the_eyes_of_another_set(tmp_path):
    source = tmp_path / 'raw'
    (source / 'train').mkdir(parents=True)
    names = ['10_left', '10_right', '11_left', '11_right', '12_left']
    for name in names:
        Image.new('RGB', (40, 30)).save(source / 'train' / f'{name}.jpeg')
    (source / 'trainLabels.csv').write_text('image,level\n' + ''.join(f'{n},{i % 5}\n'
                                                                        for i, n in enumerate(names)))
    (tmp_path / 'other.csv').write_text('image,level\n10_left,0\n11_right,1\n')
    datasets('eyepacs', source, tmp_path / 'out', '--exclude', tmp_path / 'other.csv',
             '--no_progress', cwd=tmp_path)
    rows = rows_of(tmp_path / 'out')
    assert sorted(rows) == ['10_right', '11_left', '12_left']  # names kept: EyePACS patients
    assert rows['10_right']['patient'] == '10' and rows['12_left']['source'] == 'raw'


def test_a_patient_is_never_on_two_sides_across_sources():
    """The test split and the validation split go by patient: the eyes of one EyePACS patient
    from two folders fall together, and an ODIR patient is another person than the EyePACS
    patient of the same number."""
    names = [f'{p}_{e}' for p in range(400) for e in ('left', 'right')]
    names += [f'odir{p}_{e}' for p in range(400) for e in ('left', 'right')]
    for fraction in (0.15, 0.3):
        sides = {}
        for name in names:
            sides.setdefault(patient_and_eye(name)[0], set()).add(held_out(name, fraction))
        assert all(len(side) == 1 for side in sides.values())
        eyepacs = [held_out(f'{p}_left', fraction) for p in range(400)]
        odir = [held_out(f'odir{p}_left', fraction) for p in range(400)]
        assert eyepacs != odir  # the prefix makes another person
        assert abs(np.mean(odir) - fraction) < 0.06
    levels = np.array([i % 5 for i in range(len(names))])
    train, valid = split_indices(names, levels)
    train_patients = {patient_and_eye(names[i])[0] for i in train}
    assert not train_patients & {patient_and_eye(names[i])[0] for i in valid}
