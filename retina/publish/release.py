"""Release a trained net into models/: its checkpoint, its sha256 in models/index.json, and a
model card whose figures are measured here, on patients the net never saw.

    python -m retina.release eyepacs-128 --weights data/real/weights/c_128_5x5_32_ram/weights.pt \\
        --photos data/real/e128 --labels data/real/eyepacs_labels.csv \\
        --raw ../shared/data/eyepacs_raw --raw ../shared/data/eyepacs_raw1024 --default

The net must have been trained with `train_nn.py --hold_out FRACTION`: the card's figures are
on that test split of --photos (patients no training, epoch choice or cut-off saw), with 95%
patient-bootstrap intervals; cross-camera figures grade each --raw folder (train/ and
trainLabels.csv of raw photographs) through predict.py's path, on all its photographs (what
a rerun of `predict.py FOLDER/train` gives) and on those of patients the net never trained
or validated on.  --heatmaps adds a Markdown file of heat-map scores to the card.  Running it
again with a better run's weights replaces the released files in one step.
"""
import shlex
import sys
from pathlib import Path

import click
import numpy as np

from retina.core import atomic, metrics
from retina.core.errors import UserError, handle_errors
from retina.core.options import CONTEXT_SETTINGS, labels_option, weights_option
from retina.core.paths import patient_and_eye
from retina.data.cache import converted_size
from retina.data.images import image_name
from retina.data.labels import labelled_images, load_labels, split_rows
from retina.model import checkpoint, released
from retina.model.nets import is_ram_net

# What a released checkpoint holds besides the weights (no optimizer state).
KEEP = ('format', 'config_name', 'config', 'epoch', 'seed', 'preprocessing', 'precision',
        'best_kappa', 'feature_stats', 'encoding')


def slim(state):
    """The checkpoint dict to release: weights (fp32, as trained) and what loading needs."""
    return dict({k: state[k] for k in KEEP if k in state},
                model={k: v.clone() for k, v in state['model'].items()})


def centred_scores(config_name, weights, folder, image_paths):
    """The net's output on the centred window of each converted image (fp32, as predict.py)."""
    from retina.model.inference import centred_scores as scores_of
    return scores_of(checkpoint.load_net(config_name, weights, 'cpu'), image_paths, folder)


def graded_raw(config_name, weights, folder):
    """({photo name: score}, {photo name: gradable}, labels) of predict.py's path on the
    labelled photographs of `folder`/train."""
    from retina.grade.grader import load_grader
    from retina.grade.predict import grade
    labels = load_labels(folder / 'trainLabels.csv')
    photos = sorted(p for p in (folder / 'train').iterdir() if image_name(p) in labels)
    result = grade([load_grader(config_name, weights)], photos, progress=True)
    return ({row['image']: row['mean'] for row in result.rows},
            {row['image']: row['gradable'] == 'yes' for row in result.rows}, labels)


def figures_table(rows, cuts):
    lines = ['| photographs | images (patients) | kappa (its cut-offs) | kappa (0.5..3.5) | '
             'referable AUROC | sensitivity / specificity, level ≥ 2 | Spearman |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for label, names, levels, scores in rows:
        fixed, own, auroc, rank = metrics.score_intervals(names, levels, scores, cuts)
        sens, spec = metrics.referable_rates(levels, scores, cuts)
        patients = len({patient_and_eye(n)[0] for n in names})
        lines.append(f'| {label} | {len(names)} ({patients}) | {own} | {fixed} | {auroc} | '
                     f'{sens:.2f} / {spec:.2f} | {rank} |')
    return '\n'.join(lines)


def confusion_table(levels, scores, cuts):
    from retina.core.metrics import confusion_matrix
    matrix = confusion_matrix(levels, scores, cuts)
    lines = ['| true \\ graded | 0 | 1 | 2 | 3 | 4 |', '| --- |' + ' ---: |' * 5]
    lines += [f'| {level} | ' + ' | '.join(str(v) for v in matrix[level]) + ' |'
              for level in range(5)]
    return '\n'.join(lines)


CARD = """# Released model `{name}`

{summary}

**Not a medical device.** A research reproduction of a 2015 competition solution, trained on
{n_train} photographs (and validated on {n_valid}) of {programme} at {size} px. It has not been
validated for clinical use; do not use its grades to make decisions about anyone's care.

| | |
| --- | --- |
| file | `models/{file}` ({megabytes:.1f} MB, sha256 `{sha256}`) |
| network | `{config}` ({parameters:,} parameters): {layers} |
| input | photographs cropped to the eye and resized to {size} px by convert.py (predict.py does it), look `--enhance {look}`, centred {window} px window |
| trained | {epochs} epochs (best validation kappa at epoch {epoch}), {precision}, seed {seed} |

## Data
{data_text}

## Training
{training_text}

## Figures on held-out patients
The test split is `--hold_out {hold_out}` (`retina.data.labels.held_out`): a fixed rule on the
patient id, both eyes together; no training step, epoch choice, cut-off or blend saw these
patients. Levels are the score cut at the net's own cut-offs, {cuts}, fitted on the
validation patients' scores (predict.py uses them when this net grades alone on the centred
window; kappa at the fixed 0.5, 1.5, 2.5, 3.5 beside); intervals are 95% patient-bootstrap
intervals ({rounds} resamples).

{figures}

Confusion matrix on the test split (rows: true level, columns: graded level):

{confusion}

Cross-camera: predict.py on raw camera photographs (its own crop and look). "All" is what
`python predict.py FOLDER/train` grades (some of those patients may be among the training
patients: their other, processed photographs); "unseen" keeps the patients that no training or
validation image came from.

{cross_camera}
{heatmaps}
## Use
```
python predict.py photos/ --weights_from {name} --heatmap maps
python predict.py photos/ --weights_from {name} --heatmap maps --method layercam --layer conv5
python train_nn.py --cnf {config} --weights_from {name} --train_dir data/train_{size} --labels labels.csv
```
{default_map}
## Terms and citation
The code is under the repository's LICENSE (MIT). These weights were trained on photographs of
the Kaggle "Diabetic Retinopathy Detection" competition (EyePACS){other_terms}, whose terms allow
research and non-commercial use: the weights inherit them. Cite the original solution and the
RAM paper:

- M. Antony and S. Brüggemann (team o_O), 2nd place solution of the Kaggle Diabetic
  Retinopathy Detection competition, 2015 (github.com/sveitser/kaggle_diabetic).
- Z. Wang and J. Yang, "Diabetic Retinopathy Detection via Deep Convolutional Networks for
  Discriminative Localization and Visual Explanation", AAAI Workshops, 2018
  (github.com/cauchyturing/kaggle_diabetic_RAM).

## Rebuild
{rebuild}
"""


def sources_of(labels):
    """{source: photographs} of a labels CSV's `source` column (python -m retina.datasets
    writes one), or {} without one."""
    import csv
    with open(labels, newline='', encoding='utf-8-sig') as f:
        reader = csv.DictReader(f)
        if 'source' not in (reader.fieldnames or []):
            return {}
        counts = {}
        for row in reader:
            counts[row['source'].strip()] = counts.get(row['source'].strip(), 0) + 1
    return counts


def data_words(labels):
    """(the card's 'of ...' phrase for the training photographs, its data sources in words,
    the terms sentence's other data sets)."""
    sources = sources_of(labels)
    if len(sources) < 2:
        return 'one screening programme (EyePACS)', 'EyePACS photographs', ''
    listed = ', '.join(f'{name} {count:,}' for name, count in sorted(sources.items()))
    others = sorted(name for name in sources if not name.startswith('eyepacs'))
    return (f'{len(sources)} sources ({", ".join(sorted(sources))})',
            f'photographs of {len(sources)} sources ({listed})',
            (' and of ' + ', '.join(others) + ' (see each data set\'s own terms)') if others
            else '')


def refit_released_stats(name, photos, labels, models_dir):
    """Refit released `name`'s feature statistics with one mean per level on its training
    split of `photos` (the split its own hold_out and the validation rule give), and bring its
    sha256 in the index and the card up to date."""
    import torch

    from retina.core.runtime import Runtime
    from retina.data import cache
    from retina.model.feature_stats import attach_feature_stats
    target = released.verified(name, models_dir)
    config = checkpoint.config_of(checkpoint.load(target))
    image_paths, levels = labelled_images(photos, labels)
    names = [image_name(p) for p in image_paths]
    train_rows, valid_rows, _ = split_rows(names, levels, config.cnf.get('hold_out') or 0)
    old = released.sha256_of(target)
    stats = attach_feature_stats(target, cache.load_images(image_paths, progress=False),
                                 train_rows, valid_rows, Runtime(torch.device('cpu')),
                                 levels=levels)
    checkpoint.load(target)
    new = released.sha256_of(target)
    found = released.index(models_dir)
    entry = found['models'][name]
    entry['sha256'] = new
    card = models_dir / entry['card']
    text = card.read_text().replace(old, new)
    size = f'({target.stat().st_size / 1e6:.1f} MB, sha256 `{new}`)'
    import re
    text = re.sub(r'\([0-9.]+ MB, sha256 `' + new + r'`\)', size, text)
    atomic.write_text(card, text)
    released.write_index(models_dir, name, entry, make_default=found['default'] == name)
    click.echo(f'{name}: feature statistics refit on {len(train_rows)} training photographs '
               f'({len(stats.mean.reshape(-1, stats.precision.shape[0]))} level means; '
               f'threshold {stats.threshold:.1f}); sha256 {new[:16]}…')


def default_map_text(name):
    """The card's line on the map predict.py --heatmap draws by default for `name`
    (retina.heatmaps.RELEASED_DEFAULT_MAPS), or ''."""
    from retina.heatmaps import RELEASED_DEFAULT_MAPS
    chosen = RELEASED_DEFAULT_MAPS.get(name)
    if not chosen:
        return ''
    what = chosen['method'] + (f' at {chosen["layer"]}' if chosen['layer'] else '')
    fused = f', fused with {chosen["fuse"]}\'s' if chosen['fuse'] else ''
    return (f'\n`predict.py --heatmap` draws its {what}{fused} by default, the map chosen by '
            f'measurement on HEI-MED and synthetic masks (bench/heatmap_default.md; '
            f'BENCHMARKS.md, "Heat maps: the default map of predict.py"); `--method ram` draws '
            f'its own RAM alone.\n')


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument('name')
@weights_option("The checkpoint to release (a run's weights.pt; trained with --hold_out).  "
                'Required unless --refit_feature_stats.', default_text=None, released=False,
                aliases=('--weights',), dest='weights')
@click.option('--photos', type=click.Path(file_okay=False),
              help='The converted photographs the net trained on (its --train_dir): the test '
                   'split is scored on them.  Required for a net.')
@labels_option('those of --photos.  Required for a net.')
@click.option('--raw', multiple=True, type=click.Path(file_okay=False),
              help='A folder of raw photographs (train/, trainLabels.csv) for the cross-camera '
                   'rows; repeat for several; absent folders are skipped.')
@click.option('--heatmaps', type=click.Path(dir_okay=False),
              help='A Markdown file of heat-map scores (bench/bench_heatmaps.py) for the card.')
@click.option('--training', default='', help='How it was trained, for the card (command, '
                                             'machine, time).')
@click.option('--summary', default='', help='One line for the card and the index.')
@click.option('--default/--no_default', 'make_default', default=False, show_default=True,
              help='Make it the model predict.py grades with when no weights are given.')
@click.option('--refit_feature_stats', is_flag=True,
              help="Only refit the released NAME's feature statistics (predict.py's 'unlike the "
                   "training photos' check) on its own training split of --photos under this "
                   "version's rule (one mean per level), keeping its weights and figures; its "
                   'sha256 in the index and card follow.')
@click.option('--chain', 'chain_nets', multiple=True, metavar='NET',
              help='Release a chain instead of a net: a released net the --blend was fitted '
                   'on (repeat for each, in order).')
@click.option('--blend', 'blend_file', type=click.Path(exists=True, dir_okay=False),
              help='With --chain: the blend blend.py --predict saved (data/sub_..._blend.pt).')
@click.option('--fast', metavar='NET',
              help='With --chain: the net predict.py --fast grades with alone [default: the '
                   'last --chain].')
@click.option('--figures', type=click.Path(exists=True, dir_okay=False),
              help="With --chain: a Markdown file of the chain's figures on held-out patients "
                   '(e.g. bench/bench_chain.py\'s table) for its card.')
@click.option('--models_dir', type=click.Path(file_okay=False), default=None,
              help='Where the released files go [default: models/, or $RETINA_MODELS_DIR].')
@handle_errors()
def main(name, weights, photos, labels, raw, heatmaps, training, summary, make_default,
         refit_feature_stats, chain_nets, blend_file, fast, figures, models_dir):
    """Release the net of WEIGHTS as NAME (e.g. eyepacs-128): models/NAME.pt, models/NAME.md
    and its entry in models/index.json, replacing an earlier release of that name.  With
    --chain and --blend, release a chain of released nets and their fitted blend instead."""
    import re
    if not re.fullmatch(r'[a-z0-9][a-z0-9._-]*', name):
        raise UserError(f'{name!r}: a released name is lower-case letters, digits, ., _ and -')
    models_dir = Path(models_dir or released.default_folder())
    if chain_nets or blend_file:
        if not (chain_nets and blend_file):
            raise UserError('a chain needs both --chain NET (each released net) and --blend FILE')
        from retina.publish.chain import release_chain
        release_chain(name, chain_nets, fast, blend_file, figures, summary, make_default,
                      models_dir)
        return
    if not (photos and labels):
        raise UserError('--photos and --labels: the converted photographs the net trained on and '
                        'their labels (its figures are measured on their test split)')
    photos = Path(photos)
    if refit_feature_stats:
        refit_released_stats(name, photos, labels, models_dir)
        return
    if not weights:
        raise UserError('--weights: which checkpoint to release? (or --refit_feature_stats)')
    state = checkpoint.load(weights)
    config = checkpoint.config_of(state)
    hold_out = config.cnf.get('hold_out')
    if not hold_out:
        raise UserError(f'{weights}: trained without --hold_out, so no patients are left that '
                        f'it never saw: train with train_nn.py --hold_out 0.15 to release it')
    image_paths, levels = labelled_images(photos, labels)
    if 'encoding' not in state:  # trained before checkpoints said: as its photographs are stored
        from retina.data.crop import encoding_of_files
        state['encoding'] = encoding_of_files(image_paths)
    names = [image_name(p) for p in image_paths]
    train_rows, valid_rows, test_rows = split_rows(names, levels, hold_out)
    click.echo(f'{name}: scoring {len(test_rows)} test-split photographs of {photos}')
    scores = centred_scores(config.name, weights, photos, image_paths)
    from retina.core.metrics import fit_thresholds  # its cut-offs: fitted on validation patients
    cuts = tuple(float(c) for c in fit_thresholds(levels[valid_rows], scores[valid_rows]))
    table = [('test split (' + photos.name + ')', [names[i] for i in test_rows],
              levels[test_rows], scores[test_rows]),
             ('validation split (chose the epoch: optimistic)', [names[i] for i in valid_rows],
              levels[valid_rows], scores[valid_rows])]
    trained = {patient_and_eye(names[i])[0] for i in (*train_rows, *valid_rows)}
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f'{name}.pt'
    atomic.torch_save(target, dict(slim(state), thresholds=list(cuts)))
    # Its photographs' feature statistics, fitted again on its splits under this version's rule
    import torch

    from retina.core.runtime import Runtime
    from retina.data import cache
    from retina.model.feature_stats import attach_feature_stats
    attach_feature_stats(target, cache.load_images(image_paths, progress=False), train_rows,
                         valid_rows, Runtime(torch.device('cpu')), levels=levels)
    checkpoint.load(target)  # what was written loads, and checks
    cross = []
    for folder in map(Path, raw):
        if not (folder / 'train').is_dir():
            click.echo(f'note: {folder}/train not found; no cross-camera row for it', err=True)
            continue
        graded, gradable, raw_labels = graded_raw(config.name, target, folder)
        all_names = sorted(graded)
        unseen = [n for n in all_names if patient_and_eye(n)[0] not in trained]
        bad = sum(not gradable[n] for n in all_names)
        for label, chosen in ((f'{folder.name}: all ({bad} called ungradable, their score cut '
                               f'as --grade_anyway does)', all_names),
                              (f'{folder.name}: all gradable', [n for n in all_names
                                                                if gradable[n]]),
                              (f'{folder.name}: unseen patients', unseen)):
            if chosen:
                cross.append((label, chosen, np.array([raw_labels[n] for n in chosen]),
                              np.array([graded[n] for n in chosen])))
    digest = released.sha256_of(target)
    net = config.build_net()
    log_rows = []
    log = Path(weights).parent / 'log.csv'
    if log.is_file():
        log_rows = list(open(log))[1:]
    card = CARD.format(
        default_map=default_map_text(name),
        name=name, summary=summary or f'{config.name} trained on EyePACS photographs.',
        n_train=len(names) - len(test_rows) - len(valid_rows), n_valid=len(valid_rows),
        size=converted_size(config.input_size),
        file=target.name, megabytes=target.stat().st_size / 1e6, sha256=digest,
        config=config.name, parameters=sum(p.numel() for p in net.parameters()),
        layers=('batch-norm ' if any(kind == 'bn' for kind, _ in config.layers) else '')
        + ('convolutional net with the RAM head (global average pool + linear output)'
           if is_ram_net(config.layers) else 'convolutional net'),
        look=state.get('preprocessing', 'none'), window=max(config.input_size),
        epochs=len(log_rows) or state['epoch'], epoch=state['epoch'],
        precision=state.get('precision', 'fp32'), seed=state.get('seed', 0),
        programme=data_words(labels)[0], other_terms=data_words(labels)[2],
        data_text=(f'{len(names)} {data_words(labels)[1]} of {photos} (labels {labels}), '
                   f'converted with `--enhance {state.get("preprocessing", "none")}`: '
                   f'{len(names) - len(test_rows) - len(valid_rows)} for training, '
                   f'{len(valid_rows)} for validation (10% of the other patients) and '
                   f'{len(test_rows)} held out. Levels of all {len(names)}: '
                   f'{" / ".join(str(int((levels == k).sum())) for k in range(5))} '
                   f'(0 to 4).'),
        training_text=training or '(not given)', hold_out=hold_out,
        rounds=metrics.BOOTSTRAP_ROUNDS, figures=figures_table(table, cuts),
        cuts=' '.join(f'{c:.3f}' for c in cuts),
        confusion=confusion_table(levels[test_rows], scores[test_rows], cuts),
        cross_camera=figures_table(cross, cuts) if cross else '(no raw photographs given)',
        heatmaps=('\n## Heat maps\n' + Path(heatmaps).read_text() + '\n') if heatmaps else '',
        rebuild='```\npython -m retina.release ' + shlex.join(sys.argv[1:]) + '\n```')
    card_path = models_dir / f'{name}.md'
    atomic.write_text(card_path, card)
    released.write_index(models_dir, name, dict(file=target.name, sha256=digest, config=config.name,
                                       card=card_path.name, encoding=state['encoding'],
                                       summary=summary or card.splitlines()[2]),
                make_default)
    click.echo(f'released {name}: {target} (sha256 {digest[:16]}…), card {card_path}')
