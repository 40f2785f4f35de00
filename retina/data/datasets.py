"""Graded photographs from other public sets, written in the project's format.

    python -m retina.datasets odir SOURCE OUT       # ODIR-5K: a git clone or bare snapshot
    python -m retina.datasets eyepacs SOURCE OUT    # a folder of raw EyePACS photographs

OUT gets `train/NAME.jpg` (the photographs, byte for byte) and `trainLabels.csv` with the
columns image, level, patient, eye, source (convert.py, train_nn.py and every script read its
image and level columns), plus `excluded.csv`: every eye left out and why.  A second run into
the same OUT skips the photographs already there; OUT holding another set is refused.

ODIR-5K (`MinsuChae/Ocular-Disease-Recognition`, 6,392 photographs at 512 px of 3,358
patients) grades each eye with diagnostic keywords.  Its names are prefixed (`odir123_left`)
so that they never collide with EyePACS names (`123_left` is another person).  The keyword to
level mapping (ODIR_STAGES, NOT_GRADABLE, UNSTAGED_DR) is:

- mild nonproliferative retinopathy 1, moderate non proliferative retinopathy 2, severe
  nonproliferative retinopathy 3, (severe) proliferative diabetic retinopathy 4; an eye with
  several stages takes the worst;
- normal fundus 0, and (default `--other_diseases level0`) an eye with other diseases and no
  sign of DR 0 as well, as EyePACS graders gave such eyes: a DR grade is about DR alone
  (BENCHMARKS.md, "ODIR-5K's labels", measures how the released net scores those eyes);
- excluded: DR without a stage, suspected DR, signs of DR or laser treatment without a stage,
  and photographs the graders called unusable (low image quality, no fundus image...).

`eyepacs` takes a competition-style folder (train/ or the photographs, beside
trainLabels.csv) and keeps the names: a patient stays one patient across EyePACS folders, so
the test split (retina.data.labels.held_out, a rule on the patient id) keeps both eyes and every copy
on one side.  `--exclude LABELS` leaves out the eyes another set already holds (the same
photograph at another size, e.g. eyepacs_raw1024 beside eyepacs256).
"""
import csv
import io
import json
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import click

from retina.core.atomic import write_bytes, write_text
from retina.core.errors import UserError, first_few, handle_errors
from retina.core.options import CONTEXT_SETTINGS, no_progress_option
from retina.core.paths import IMAGE_EXTENSIONS, patient_and_eye
from retina.data.labels import load_labels

COLUMNS = ('image', 'level', 'patient', 'eye', 'source')
ODIR_PREFIX = 'odir'
ODIR_LABELS = 'full_df.csv'
ODIR_IMAGES = 'preprocessed_images'
ODIR_STAGES = {
    'mild nonproliferative retinopathy': 1,
    'moderate non proliferative retinopathy': 2,
    'severe nonproliferative retinopathy': 3,
    'proliferative diabetic retinopathy': 4,
    'severe proliferative diabetic retinopathy': 4,
}
NORMAL = 'normal fundus'
# Photographs the graders could not use: no grade can be trusted.
NOT_GRADABLE = {'low image quality', 'no fundus image', 'anterior segment image', 'image offset',
                'optic disk photographically invisible'}
# DR named or suspected without a stage, or its signs and treatment without one: the level
# cannot be told, and calling such an eye 0 would teach the net that DR is healthy.
UNSTAGED_DR = {'diabetic retinopathy', 'suspected diabetic retinopathy',
               'suspicious diabetic retinopathy', 'suspected moderate non proliferative retinopathy',
               'intraretinal hemorrhage', 'intraretinal microvascular abnormality',
               'suspected microvascular anomalies', 'laser spot', 'fundus laser photocoagulation spots',
               'post laser photocoagulation', 'post retinal laser surgery'}
# Not a disease: dust on the lens is a photograph's blemish.
HARMLESS = {'lens dust'}
OTHER_DISEASES = ('level0', 'exclude')


def keywords(text):
    """ODIR's keyword cell -> the keywords (split on ASCII and full-width commas)."""
    return [k.strip().lower() for k in text.replace('\uff0c', ',').split(',') if k.strip()]


def odir_level(words, other_diseases='level0'):
    """(level, None) or (None, why excluded) for one eye's ODIR keywords."""
    words = set(words)
    if not words:
        return None, 'no keywords'
    unusable = sorted(words & NOT_GRADABLE)
    if unusable:
        return None, f'photograph unusable ({", ".join(unusable)})'
    stages = [ODIR_STAGES[w] for w in words if w in ODIR_STAGES]
    if stages:
        return max(stages), None
    unstaged = sorted(words & UNSTAGED_DR)
    if unstaged:
        return None, f'DR without a stage ({", ".join(unstaged)})'
    others = sorted(words - {NORMAL} - HARMLESS)
    if not others:
        return 0, None
    if other_diseases == 'exclude':
        return None, f'other diseases, no DR ({", ".join(others)})'
    return 0, None


class _Snapshot:
    """A git clone (work tree) or a bare repository of ODIR: the labels' text and the
    photographs as (file name, bytes)."""

    def __init__(self, source):
        self.source = Path(source)
        if (self.source / ODIR_LABELS).is_file():
            self.bare = False
            if not (self.source / ODIR_IMAGES).is_dir():
                raise UserError(f'{self.source}: {ODIR_IMAGES}/ is missing beside {ODIR_LABELS}; '
                                f'clone the whole repository')
        elif (self.source / 'HEAD').is_file() and (self.source / 'objects').is_dir():
            self.bare = True
        elif (self.source / '.git').exists():
            raise UserError(f'{self.source}: a git clone without {ODIR_LABELS} in its work tree; '
                            f'check out commit 28a3619 (git -C {self.source} checkout 28a3619)')
        else:
            raise UserError(f'{self.source}: not a clone or snapshot of ODIR-5K (no {ODIR_LABELS}); '
                            f'git clone https://github.com/MinsuChae/Ocular-Disease-Recognition')

    def _git(self, *args):
        if shutil.which('git') is None:
            raise UserError(f'{self.source} is a bare git repository and git is not installed; '
                            f'install git or give a clone with its files')
        return ['git', '--git-dir', str(self.source), *args]

    def labels_text(self):
        if not self.bare:
            return (self.source / ODIR_LABELS).read_text(encoding='utf-8-sig')
        done = subprocess.run(self._git('show', f'HEAD:{ODIR_LABELS}'), capture_output=True)
        if done.returncode:
            raise UserError(f'{self.source}: no {ODIR_LABELS} at HEAD '
                            f'({done.stderr.decode(errors="replace").strip()[:200]})')
        return done.stdout.decode('utf-8-sig')

    def photographs(self, wanted):
        """Yield (file name, bytes) for the file names in `wanted` that the snapshot holds."""
        if not self.bare:
            for name in sorted(wanted):
                path = self.source / ODIR_IMAGES / name
                if path.is_file():
                    yield name, path.read_bytes()
            return
        process = subprocess.Popen(self._git('archive', '--format=tar', 'HEAD', ODIR_IMAGES),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=process.stdout, mode='r|') as tar:
                for member in tar:
                    name = Path(member.name).name
                    if member.isfile() and name in wanted:
                        yield name, tar.extractfile(member).read()
        finally:
            process.stdout.close()
            error = process.stderr.read().decode(errors='replace').strip()
            if process.wait():
                raise UserError(f'{self.source}: git archive failed ({error[:200]})')


def _odir_eyes(labels_text, source_name):
    """Every eye of full_df.csv once: (file name, keywords) in ID order."""
    rows = list(csv.DictReader(io.StringIO(labels_text)))
    needed = ('ID', 'Left-Fundus', 'Right-Fundus', 'Left-Diagnostic Keywords',
              'Right-Diagnostic Keywords')
    if not rows or any(column not in rows[0] for column in needed):
        raise UserError(f'{source_name}: {ODIR_LABELS} lacks the columns {", ".join(needed)}')
    eyes = {}
    for row in rows:  # ODIR's full_df.csv repeats each patient once per photograph
        for side in ('Left', 'Right'):
            eyes.setdefault(row[f'{side}-Fundus'].strip(), keywords(row[f'{side}-Diagnostic Keywords']))
    return eyes


def odir_rows(eyes, other_diseases='level0'):
    """(rows, excluded): the label rows by file name and {file name: why} for the rest."""
    rows, excluded = {}, {}
    for file_name, words in eyes.items():
        stem = Path(file_name).stem
        patient, eye = patient_and_eye(stem)
        if not eye:
            excluded[file_name] = 'name is not ID_left/ID_right'
            continue
        level, why = odir_level(words, other_diseases)
        if why:
            excluded[file_name] = why
            continue
        rows[file_name] = {'image': f'{ODIR_PREFIX}{patient}_{eye}', 'level': level,
                           'patient': f'{ODIR_PREFIX}{patient}', 'eye': eye, 'source': 'odir'}
    return rows, excluded


class _Output:
    """OUT/train/, OUT/trainLabels.csv, OUT/excluded.csv and OUT/dataset.json (what made it)."""

    def __init__(self, out, record):
        self.out, self.train = Path(out), Path(out) / 'train'
        self.record = record
        made = self.out / 'dataset.json'
        if made.is_file():
            earlier = json.loads(made.read_text())
            if earlier != record:
                raise UserError(f'{self.out} holds another data set ({earlier.get("kind")} from '
                                f'{earlier.get("source")}, options {earlier.get("options")}); '
                                f'choose a new folder')
        elif self.out.is_dir() and any(self.out.iterdir()):
            raise UserError(f'{self.out}: folder is not empty and was not made by this command; '
                            f'choose a new folder')
        self.train.mkdir(parents=True, exist_ok=True)
        write_text(made, json.dumps(record, indent=1) + '\n')

    def has(self, name):
        return (self.train / name).is_file()

    def add(self, name, data):
        write_bytes(self.train / name, data)

    def finish(self, rows, excluded):
        lines = [','.join(COLUMNS)]
        lines += [','.join(str(row[c]) for c in COLUMNS)
                  for row in sorted(rows, key=lambda r: r['image'])]
        write_text(self.out / 'trainLabels.csv', '\n'.join(lines) + '\n')
        lines = ['file,reason'] + [f'{name},"{why}"' for name, why in sorted(excluded.items())]
        write_text(self.out / 'excluded.csv', '\n'.join(lines) + '\n')


def make_odir(source, out, other_diseases='level0', progress=True, echo=print):
    """Write ODIR-5K's DR-graded eyes to OUT; returns the label rows written."""
    snapshot = _Snapshot(source)
    eyes = _odir_eyes(snapshot.labels_text(), source)
    rows, excluded = odir_rows(eyes, other_diseases)
    output = _Output(out, {'kind': 'odir', 'source': str(Path(source).resolve()),
                           'options': {'other_diseases': other_diseases}})
    wanted = {name for name in rows if not output.has(rows[name]['image'] + Path(name).suffix)}
    found = set(rows) - wanted
    with click.progressbar(length=len(wanted), label='ODIR photographs', file=None if progress
                           else io.StringIO()) as bar:
        for name, data in snapshot.photographs(wanted):
            output.add(rows[name]['image'] + Path(name).suffix.lower(), data)
            found.add(name)
            bar.update(1)
    for name in set(rows) - found:
        excluded[name] = 'photograph not in the snapshot'
        del rows[name]
    output.finish(rows.values(), excluded)
    _summary(out, rows.values(), excluded, echo)
    return list(rows.values())


def _photographs_of(folder):
    folder = Path(folder)
    images = folder / 'train' if (folder / 'train').is_dir() else folder
    labels = folder / 'trainLabels.csv'
    if not labels.is_file():
        raise UserError(f'{labels}: labels file not found; an EyePACS folder holds train/ (or the '
                        f'photographs) beside trainLabels.csv')
    paths = {p.stem: p for p in sorted(images.iterdir())
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith('.')}
    if not paths:
        raise UserError(f'{images}: no photographs found')
    return paths, load_labels(labels)


def make_eyepacs(source, out, exclude=(), source_name=None, progress=True, echo=print):
    """Write a raw EyePACS folder's labelled photographs to OUT, leaving out the names of every
    `exclude` labels file; returns the label rows written."""
    paths, labels = _photographs_of(source)
    source_name = source_name or Path(source).resolve().name
    held = set()
    for other in exclude:
        held |= set(load_labels(other))
    excluded = {}
    rows = []
    for name, path in paths.items():
        if name not in labels:
            excluded[path.name] = 'no label'
        elif name in held:
            excluded[path.name] = 'in ' + first_few([Path(e).parent.name for e in exclude], 3, ' or ')
        else:
            patient, eye = patient_and_eye(name)
            rows.append((path, {'image': name, 'level': labels[name], 'patient': patient,
                                'eye': eye, 'source': source_name}))
    output = _Output(out, {'kind': 'eyepacs', 'source': str(Path(source).resolve()),
                           'options': {'exclude': [str(Path(e).resolve()) for e in exclude],
                                       'source_name': source_name}})
    with click.progressbar(rows, label='EyePACS photographs',
                           file=None if progress else io.StringIO()) as bar:
        for path, row in bar:
            target = row['image'] + path.suffix.lower()
            if not output.has(target):
                output.add(target, path.read_bytes())
    output.finish([row for _, row in rows], excluded)
    _summary(out, [row for _, row in rows], excluded, echo)
    return [row for _, row in rows]


def _summary(out, rows, excluded, echo):
    levels = Counter(row['level'] for row in rows)
    patients = len({row['patient'] for row in rows})
    reasons = Counter(why.split(' (')[0] for why in excluded.values())
    echo(f'{out}: {len(rows)} photographs of {patients} patients, levels '
         + ' / '.join(str(levels.get(level, 0)) for level in range(5))
         + f'; {len(excluded)} left out'
         + (' (' + ', '.join(f'{n} {why}' for why, n in reasons.most_common()) + ')' if excluded else '')
         + f'; see {Path(out) / "excluded.csv"}')


@click.group(context_settings=CONTEXT_SETTINGS)
def main():
    """Write a public set's graded photographs as OUT/train/ and OUT/trainLabels.csv (image,
    level, patient, eye, source), ready for convert.py and train_nn.py."""


@main.command('odir')
@click.argument('source', type=click.Path(exists=True, file_okay=False))
@click.argument('out', type=click.Path(file_okay=False))
@click.option('--other_diseases', type=click.Choice(OTHER_DISEASES), default='level0',
              show_default=True,
              help='Eyes with other diseases (cataract, glaucoma, AMD...) and no sign of DR: '
                   'level 0, as a DR grade is about DR alone, or left out.')
@no_progress_option()
@handle_errors()
def odir_command(source, out, other_diseases, no_progress):
    """ODIR-5K from SOURCE, a git clone or bare snapshot of MinsuChae/Ocular-Disease-Recognition
    (commit 28a3619): each eye's keywords mapped to a DR level (see retina/data/datasets.py), names
    prefixed odir (odir123_left), excluded eyes listed in OUT/excluded.csv."""
    make_odir(source, out, other_diseases, progress=not no_progress, echo=click.echo)


@main.command('eyepacs')
@click.argument('source', type=click.Path(exists=True, file_okay=False))
@click.argument('out', type=click.Path(file_okay=False))
@click.option('--exclude', multiple=True, type=click.Path(exists=True, dir_okay=False),
              metavar='LABELS', help='Leave out the photographs named in this labels CSV (an '
                                     'EyePACS set already used); repeatable.')
@click.option('--source_name', help="The source column's value [default: SOURCE's folder name].")
@no_progress_option()
@handle_errors()
def eyepacs_command(source, out, exclude, source_name, no_progress):
    """A raw EyePACS folder (train/ beside trainLabels.csv): its labelled photographs under
    their own names (the patient ids stay EyePACS's), without those in --exclude."""
    make_eyepacs(source, out, exclude, source_name, progress=not no_progress, echo=click.echo)
