"""predict.py --report: one HTML page of a graded folder, checked as text and in a real browser
(headless Chromium, skipped where none is installed)."""
import csv
import html
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import run_script

BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable', 'chrome')


@pytest.fixture(scope='module')
def report(tmp_path_factory, synthetic_source):
    """The report of both eyes of three patients, a black frame (ungradable) and a broken file,
    graded by the released eyepacs-128: (report path, CSV rows by image)."""
    work = tmp_path_factory.mktemp('report')
    photos = work / 'photos'
    photos.mkdir()
    names = {p.stem for p in (synthetic_source / 'test').glob('*.jpeg')}
    pairs = sorted(n[:-5] for n in names if n.endswith('_left') and n[:-5] + '_right' in names)[:3]
    for patient in pairs:
        for eye in ('left', 'right'):
            shutil.copy(synthetic_source / 'test' / f'{patient}_{eye}.jpeg', photos)
    Image.new('RGB', (300, 200)).save(photos / '999_left.png')       # no eye: ungradable
    (photos / 'broken.jpeg').write_bytes(b'not a photograph')
    result = run_script('predict.py', photos, '--weights_from', 'eyepacs-128', '--report',
                        work / 'out' / 'report.html', '--output', work / 'grades.csv',
                        '--no_progress', cwd=work, check=False)
    assert result.returncode == 1 and 'broken.jpeg' in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr
    with open(work / 'grades.csv') as f:
        rows = {row['image']: row for row in csv.DictReader(f)}
    assert len(rows) == 7 and rows['999_left']['gradable'] == 'no'
    return work / 'out' / 'report.html', rows


def test_report_holds_the_model_the_table_the_pairs_and_the_ungradable_apart(report):
    path, rows = report
    page = path.read_text(encoding='utf-8')
    from retina.model import released
    entry = released.index()['models']['eyepacs-128']
    assert 'eyepacs-128' in page and entry['sha256'] in page
    assert '<td>test split (e128)</td>' in page, 'the card\'s test-split figures'
    table = page[page.index('<table id="grades">'):]
    table = table[:table.index('</table>')]
    assert table.count('<tr>') == 1 + len(rows)
    gradable, ungradable = page.split('<section class="ungradable">')
    for name, row in rows.items():
        if row['gradable'] == 'no':
            assert f'id="eye-{name}"' in ungradable and f'id="eye-{name}"' not in gradable
            assert html.escape(row['reasons']) in ungradable
    for section in re.findall(r'<section class="patient">(.*?)</section>', gradable, re.S):
        patient = re.search(r'<h3>patient (\w+)</h3>', section).group(1)
        assert f'id="eye-{patient}_left"' in section and f'id="eye-{patient}_right"' in section
    assert 'broken.jpeg' in page, 'the file that could not be read is named'
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 2 * len(rows)          # each photograph beside its map
    for source in sources:                        # beside the page, nothing from a network
        assert not re.match(r'\w+:', source) and (path.parent / source).is_file(), source
    assert 'http://' not in page and 'https://' not in page


def chromium():
    return next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


def browse(browser, url, *options, profile):
    """Run headless Chromium on `url` (file://) until its page is quiet; stdout."""
    result = subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu',
                             '--no-first-run', f'--user-data-dir={profile}',
                             '--virtual-time-budget=10000', *options, url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def body_attributes(dom):
    tag = re.search(r'<body([^>]*)>', dom).group(1)
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', tag))


@pytest.mark.skipif(chromium() is None,
                    reason='no Chromium binary on PATH (chromium, chromium-browser or '
                           'google-chrome); install it with: apt-get install -y chromium')
def test_report_in_a_real_browser_sorts_on_a_click_and_loads_every_picture(report, tmp_path):
    """The page, opened from the disk: its table has a row per photograph, a click on 'score'
    sorts by score (a second click the other way), every picture loads, and it has a
    screenshot (left in the test's folder)."""
    path, rows = report
    browser = chromium()
    url = path.resolve().as_uri()
    by_score = sorted(rows, key=lambda name: float(rows[name]['mean']))
    for fragment, expected in (('#sort=score', by_score), ('#sort=-score', by_score[::-1])):
        found = body_attributes(browse(browser, url + fragment, '--dump-dom',
                                       profile=tmp_path / 'profile'))
        assert found['rows'] == str(len(rows))
        assert found['sorted-by'] == fragment[len('#sort='):]
        assert found['order'].split(',') == expected
        assert int(found['images']) == 2 * len(rows)
        assert found['images-loaded'] == found['images'], 'a picture did not load'
    screenshot = tmp_path / 'report.png'
    browse(browser, url, f'--screenshot={screenshot}', '--window-size=1280,1600',
           '--hide-scrollbars', profile=tmp_path / 'profile')
    with Image.open(screenshot) as picture:
        assert picture.size == (1280, 1600)
        assert len(np.unique(np.asarray(picture.convert('L')))) > 50, 'a blank screenshot'


def test_card_figures_are_the_test_split_rows_of_the_model_itself(tmp_path):
    """A net's card: its 'test split' rows; a chain's card (one table of several graders): the
    chain's own rows, never a single net's; a card without such a table: nothing."""
    from retina.grade.report import test_split_rows
    card = tmp_path / 'card.md'
    card.write_text('# x\n\n| photographs | kappa |\n| --- | --- |\n| test split (e256) | 0.3 |\n'
                    '| eyepacs_raw | 0.2 |\n\nText.\n\n| photographs (patients) | grader | kappa |\n'
                    '| --- | --- | --- |\n| all test splits | x-chain (default) | 0.4 |\n'
                    '| all test splits | x-256 | 0.3 |\n| odir test split | x-chain (default) | 0.5 |\n')
    assert test_split_rows(card, 'x-256') == (['photographs', 'kappa'], [['test split (e256)', '0.3']])
    chain = tmp_path / 'chain.md'
    chain.write_text(card.read_text().split('Text.')[1])
    header, rows = test_split_rows(chain, 'x-chain')
    assert header[:2] == ['photographs (patients)', 'grader']
    assert [r[0] for r in rows] == ['all test splits', 'odir test split']
    assert all(r[1].startswith('x-chain') for r in rows)
    chain.write_text('# no table\n')
    assert test_split_rows(chain, 'x-chain') == ([], [])
