"""The report of a graded folder (predict.py --report report.html): one HTML page for a reader.

It opens offline in any browser, from the disk, with no server and no network: the page is
one file with its style and script inline, and its pictures lie in a folder beside it
(REPORT_stem_files/: a copy of each photograph shrunk to THUMBNAIL_WIDTH, and each heat-map
picture as predict.py draws it), linked by relative paths, so the two move together.

What it holds, top to bottom:
- the model: each net's released name (or weights file), its sha256, and its model card's
  test-split figures (the rows of the card's "Figures on held-out patients" table that
  start with "test split"), the date and the command;
- a table of every photograph (patient, eye, image, level, score, gradable, reasons) that
  sorts on a click of any header (again: the other way), or on open with #sort=COLUMN
  (#sort=-COLUMN: descending) in the address;
- the gradable photographs by patient, both eyes side by side, each photograph beside its
  map; then the ungradable ones set apart, each with its reasons; then the files that could
  not be read.

The page's script records what it did in the body's data attributes (data-rows, data-order,
data-images, data-images-loaded), so a headless browser's --dump-dom can check it.
"""
import datetime
import html
import os
import re
import shutil
from pathlib import Path

from retina.core import atomic
from retina.core.errors import UserError
from retina.core.paths import patient_and_eye
from retina.data.images import image_name
from retina.model import released

THUMBNAIL_WIDTH = 800       # the photographs' copies beside the report (the maps keep their size)
COLUMNS = ('patient', 'eye', 'image', 'level', 'score', 'gradable', 'reasons')
NUMERIC = {'level', 'score'}


def files_folder(report_path):
    """The folder beside `report_path` that holds its pictures: report.html -> report_files/."""
    report_path = Path(report_path)
    return report_path.with_name(f'{report_path.stem}_files')


def check_report_path(report_path):
    """A UserError unless `report_path` can be written as an HTML report."""
    report_path = Path(report_path)
    if report_path.suffix.lower() not in ('.html', '.htm'):
        raise UserError(f'--report {report_path}: the report is an HTML page; name it '
                        f'{report_path.with_suffix(".html").name}')
    if report_path.is_dir():
        raise UserError(f'--report {report_path}: a folder; name a file such as '
                        f'{report_path / "report.html"}')
    atomic.check_writable(report_path)


def model_entries(weights_files):
    """[(name, sha256, card path or None)] for each weights file: a released model's short
    name and card when the file is one of models/ (by checksum), else the file's path."""
    digests = {}
    try:
        entries = released.index()['models']
    except UserError:
        entries = {}
    for name, entry in entries.items():
        digests[entry['sha256']] = (name, released.default_folder() / entry['card'])
    found = []
    for weights in weights_files:
        digest = released.sha256_of(weights)
        name, card = digests.get(digest, (str(weights), None))
        found.append((name, digest, card))
    return found


def test_split_rows(card, name=None):
    """(header cells, [row cells]) of the card's held-out table: the first table headed
    'photographs...' with rows on a test split ('test split (e256)', 'all test splits'); in a
    table with a 'grader' column (a chain's card, the single nets beside it), only the rows of
    grader `name`.  ([], []) when the card has none."""
    if card is None or not Path(card).is_file():
        return [], []
    header, rows = [], []
    for line in Path(card).read_text(encoding='utf-8').splitlines() + ['']:
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if not line.startswith('|'):  # a table ends
            if rows:
                return header, rows
            header = []
        elif line.startswith('| photographs') and not header:
            header = cells
        elif header and 'test split' in cells[0] and (
                'grader' not in header or name is None
                or cells[header.index('grader')].startswith(name)):
            rows.append(cells)
    return [], []


def _thumbnail(photo_path, out_path):
    """A copy of the photograph, upright (EXIF) and at most THUMBNAIL_WIDTH wide, as JPEG."""
    from retina.data.images import load_rgb
    from PIL import Image
    image = load_rgb(photo_path)
    if image.width > THUMBNAIL_WIDTH:
        image = image.resize((THUMBNAIL_WIDTH, round(image.height * THUMBNAIL_WIDTH / image.width)),
                             Image.Resampling.LANCZOS)
    atomic.save_image(out_path, image, quality=90)


def maps_by_image(names, heat_maps):
    """{image name: [map paths]}: each picture goes to the longest name its file name starts
    with ({image}_{method}_{cnf}.png), so '1_left' never takes the maps of '1_left_b'."""
    found = {name: [] for name in names}
    ordered = sorted(names, key=len, reverse=True)
    for path in heat_maps:
        stem = Path(path).name
        owner = next((n for n in ordered if stem.startswith(f'{n}_')), None)
        if owner is not None:
            found[owner].append(Path(path))
    return found


def _score(row):
    return row['blend'] if 'blend' in row else row['mean']


def _link(path, report_dir):
    return html.escape(Path(os.path.relpath(path, report_dir)).as_posix(), quote=True)


def write_report(report_path, result, photo_paths, weights_files, command=''):
    """Write the report of `result` (`retina.grade.predict.Result`) as `report_path`, its pictures
    into `files_folder(report_path)`: the photographs of `photo_paths` shrunk, and each map
    of `result.heat_maps` (copied unless it is there already).  `weights_files` are the
    graders' weights (and a fused net's) in order; `command` is shown as run."""
    report_path = Path(report_path)
    folder = files_folder(report_path)
    folder.mkdir(parents=True, exist_ok=True)
    report_dir = report_path.parent.resolve()
    by_name = {image_name(p): Path(p) for p in photo_paths}
    rows = result.rows
    maps = maps_by_image([r['image'] for r in rows], result.heat_maps)
    pictures = {}
    for row in rows:
        name = row['image']
        photo = folder / f'{name}_photo.jpeg'
        _thumbnail(by_name[name], photo)
        shown = []
        for path in maps[name]:
            target = folder / path.name
            if path.resolve() != target.resolve():
                shutil.copyfile(path, target)
            shown.append(target)
        pictures[name] = (photo, shown)
    atomic.write_text(report_path, _page(result, rows, pictures, weights_files, command,
                                         report_dir))
    return report_path


def _model_section(weights_files):
    parts = []
    for name, digest, card in model_entries(weights_files):
        header, test_rows = test_split_rows(card, name)
        card_note = (f' (model card <code>{html.escape(f"{card.parent.name}/{card.name}")}</code>)'
                     if card else ' (not a released model: no model card)')
        parts.append(f'<h3>{html.escape(name)}</h3><p class="sha">sha256 <code>{digest}</code>'
                     f'{card_note}</p>')
        if test_rows:
            head = ''.join(f'<th>{html.escape(c)}</th>' for c in header)
            body = ''.join('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in cells) + '</tr>'
                           for cells in test_rows)
            parts.append('<p>Figures on held-out patients, from the card:</p>'
                         f'<table class="card"><thead><tr>{head}</tr></thead>'
                         f'<tbody>{body}</tbody></table>')
    return '\n'.join(parts)


def _cell(column, row):
    patient, eye = patient_and_eye(row['image'])
    value = {'patient': patient, 'eye': eye, 'image': row['image'],
             'level': '' if row['level'] in (None, '') else row['level'],
             'score': _score(row), 'gradable': row['gradable'],
             'reasons': row.get('reasons', '')}[column]
    text = f'{value:.2f}' if isinstance(value, float) else str(value)
    sort = f'{value:.6f}' if isinstance(value, float) else str(value)
    return f'<td data-sort="{html.escape(sort, quote=True)}">{html.escape(text)}</td>'


def _eye_block(row, pictures, report_dir):
    photo, shown = pictures[row['image']]
    level = row['level']
    grade = (f'level {level}' if level not in (None, '') else 'no level') + \
        f', score {_score(row):.2f}'
    reasons = (f'<p class="reasons">ungradable: {html.escape(row["reasons"])}</p>'
               if row['gradable'] == 'no' else '')
    images = [f'<figure><img src="{_link(photo, report_dir)}" alt="photograph {html.escape(row["image"])}">'
              f'<figcaption>photograph</figcaption></figure>']
    images += [f'<figure><img src="{_link(path, report_dir)}" alt="heat map {html.escape(path.stem)}">'
               f'<figcaption>{html.escape(path.stem)}</figcaption></figure>' for path in shown]
    return (f'<div class="eye" id="eye-{html.escape(row["image"], quote=True)}">'
            f'<h4>{html.escape(row["image"])}: {grade}</h4>{reasons}'
            f'<div class="pictures">{"".join(images)}</div></div>')


def _page(result, rows, pictures, weights_files, command, report_dir):
    table_rows = ''.join('<tr>' + ''.join(_cell(c, row) for c in COLUMNS) + '</tr>' for row in rows)
    head = ''.join(f'<th data-column="{c}" data-numeric="{int(c in NUMERIC)}">{c}</th>'
                   for c in COLUMNS)
    gradable = [r for r in rows if r['gradable'] != 'no']
    ungradable = [r for r in rows if r['gradable'] == 'no']
    patients = {}
    for row in gradable:
        patients.setdefault(patient_and_eye(row['image'])[0], []).append(row)
    eye_order = {'left': 0, 'right': 1, '': 2}
    by_patient = ''.join(
        f'<section class="patient"><h3>patient {html.escape(patient)}</h3><div class="eyes">'
        + ''.join(_eye_block(r, pictures, report_dir) for r in
                  sorted(eyes, key=lambda r: eye_order[patient_and_eye(r['image'])[1]]))
        + '</div></section>'
        for patient, eyes in sorted(patients.items(), key=lambda item: _natural(item[0])))
    set_apart = ''.join(_eye_block(r, pictures, report_dir) for r in ungradable) or \
        '<p>None: every photograph is gradable.</p>'
    failed = ''.join(f'<li>{html.escape(m)}</li>' for m in result.failed)
    when = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
    return _TEMPLATE.format(
        count=len(rows), ungradable=len(ungradable), when=when,
        command=html.escape(command), models=_model_section(weights_files), head=head,
        rows=table_rows, by_patient=by_patient or '<p>No gradable photograph.</p>',
        set_apart=set_apart,
        failed=f'<h2>Not read</h2><ul>{failed}</ul>' if failed else '',
        script=_SCRIPT)


def _natural(text):
    """'10' after '9': numbers compared as numbers."""
    return [int(p) if p.isdigit() else p for p in re.split(r'(\d+)', text)]


_SCRIPT = r"""
(function () {
  var table = document.getElementById('grades');
  var body = table.tBodies[0];
  var state = {column: null, descending: false};
  function key(row, index, numeric) {
    var text = row.cells[index].getAttribute('data-sort');
    if (!numeric) return text;
    return text === '' ? Infinity : parseFloat(text);
  }
  function record() {
    var first = [];
    for (var i = 0; i < body.rows.length; i++) first.push(body.rows[i].cells[2].textContent);
    document.body.setAttribute('data-rows', String(body.rows.length));
    document.body.setAttribute('data-order', first.join(','));
    document.body.setAttribute('data-sorted-by',
      state.column === null ? '' : (state.descending ? '-' : '') + state.column);
  }
  function sortBy(header, descending) {
    var index = header.cellIndex, numeric = header.getAttribute('data-numeric') === '1';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, index, numeric), y = key(b, index, numeric);
      var order = numeric ? (x < y ? -1 : x > y ? 1 : 0) : String(x).localeCompare(String(y),
        undefined, {numeric: true});
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    var headers = table.tHead.rows[0].cells;
    for (var i = 0; i < headers.length; i++) headers[i].removeAttribute('aria-sort');
    header.setAttribute('aria-sort', descending ? 'descending' : 'ascending');
    state.column = header.getAttribute('data-column');
    state.descending = descending;
    record();
  }
  var headers = table.tHead.rows[0].cells;
  for (var i = 0; i < headers.length; i++) {
    headers[i].addEventListener('click', function (event) {
      var header = event.currentTarget;
      var again = state.column === header.getAttribute('data-column');
      sortBy(header, again ? !state.descending : false);
    });
  }
  function fromHash() {
    var match = /sort=(-?)(\w+)/.exec(window.location.hash);
    if (!match) return;
    var header = table.querySelector('th[data-column="' + match[2] + '"]');
    if (!header) return;
    header.click();                           // sorted as a reader's click sorts
    if (match[1] === '-' && !state.descending) header.click();
  }
  function images() {
    var all = document.images, loaded = 0;
    for (var i = 0; i < all.length; i++) if (all[i].complete && all[i].naturalWidth > 0) loaded++;
    document.body.setAttribute('data-images', String(all.length));
    document.body.setAttribute('data-images-loaded', String(loaded));
  }
  record();
  fromHash();
  window.addEventListener('hashchange', fromHash);
  window.addEventListener('load', images);
  images();
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Grades of {count} photographs</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
#grades th {{ cursor: pointer; background: #eee; user-select: none; }}
#grades th[aria-sort="ascending"]::after {{ content: " \\25B2"; }}
#grades th[aria-sort="descending"]::after {{ content: " \\25BC"; }}
.sha code {{ font-size: 0.85em; }}
.eyes {{ display: flex; flex-wrap: nowrap; gap: 1em; }}  /* both eyes side by side */
.eye {{ border: 1px solid #ddd; padding: 0.5em; }}
.pictures {{ display: flex; gap: 0.5em; align-items: flex-start; }}
figure {{ margin: 0; width: min(300px, 21vw); }}
figcaption {{ font-size: 0.85em; overflow-wrap: anywhere; }}
img {{ width: 100%; height: auto; display: block; }}
.ungradable .eye {{ border-color: #c33; }}
.reasons {{ color: #b00; font-weight: bold; }}
.warning {{ background: #fff4d6; padding: 0.5em; }}
</style>
</head>
<body>
<h1>Grades of {count} photographs</h1>
<p class="warning">Not a medical device: research software; do not use these grades to make
decisions about anyone's care.</p>
<p>Made {when} by <code>{command}</code>. {ungradable} ungradable (set apart below, with their
reasons).</p>
<h2>Model</h2>
{models}
<h2>Photographs</h2>
<p>Click a column's header to sort by it (again: the other way).  Score: the blend's when a
blend graded, else the nets' mean; an ungradable photograph has no level.</p>
<table id="grades"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
<h2>Gradable photographs, by patient</h2>
<p>Each photograph beside its heat map (the map's colour bar and scale are on the picture).</p>
{by_patient}
<section class="ungradable">
<h2>Ungradable photographs</h2>
{set_apart}
</section>
{failed}
<script>{script}</script>
</body>
</html>
"""
