"""The documents: every link between them lands on a file and a heading, BENCHMARKS.md keeps the
titles the benchmark scripts rewrite, and bench/report.py rewrites a section where it stands."""
import ast
import re
import sys

import pytest

from conftest import REPO

DOCS = [REPO / 'README.md', REPO / 'BENCHMARKS.md', REPO / 'bench' / 'HISTORY.md',
        *sorted((REPO / 'docs').glob('*.md'))]


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(path):
    text = re.sub(r'```.*?```', '', path.read_text(), flags=re.S)
    return {anchor(m) for m in re.findall(r'^#+ (.+)$', text, re.M)}


@pytest.mark.parametrize('page', DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_between_the_documents_lands_on_a_file_and_heading(page):
    broken = []
    for target in re.findall(r'\]\(([^)\s]+)\)', page.read_text()):
        if re.match(r'[a-z]+:', target):
            continue
        file, _, fragment = target.partition('#')
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif fragment and path.suffix == '.md' and fragment not in anchors(path):
            broken.append(target)
    assert broken == []


def _titles_written_by_the_benchmarks():
    """The fixed section titles of bench/*.py: SECTION constants, literal replace_section
    titles and the default of a --section option."""
    titles = set()
    for script in sorted((REPO / 'bench').glob('*.py')):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Assign) and [getattr(t, 'id', None) for t in node.targets] \
                    == ['SECTION'] and isinstance(node.value, ast.Constant):
                titles.add(node.value.value)
            elif isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'replace_section' \
                    and node.args and isinstance(node.args[0], ast.Constant):
                titles.add(node.args[0].value)
            elif isinstance(node, ast.Call) and node.args and \
                    getattr(node.args[0], 'value', None) == '--section':
                titles |= {k.value.value for k in node.keywords
                           if k.arg == 'default' and isinstance(k.value, ast.Constant)
                           and k.value.value}
    return titles


def test_benchmarks_keeps_every_title_a_benchmark_script_rewrites():
    headings = set(re.findall(r'^## (.+)$', (REPO / 'BENCHMARKS.md').read_text(), re.M))
    titles = _titles_written_by_the_benchmarks()
    assert 'Gradability: what predict.py calls ungradable' in titles
    assert sorted(titles - headings) == []


def test_the_benchmarks_contents_list_their_sections_in_the_page():
    text = (REPO / 'BENCHMARKS.md').read_text()
    contents = text.split('## Contents', 1)[1].split('\n## ', 1)[0]
    listed = re.findall(r'^- \[(.+?)\]\(#(.+?)\)', contents, re.M)
    assert len(listed) >= 6
    headings = re.findall(r'^## (.+)$', text, re.M)
    for title, link in listed:
        assert title in headings and link == anchor(title), title


def test_replace_section_rewrites_a_section_where_it_stands(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / 'bench'))
    sys.modules.pop('report', None)
    from report import replace_section
    page = tmp_path / 'BENCHMARKS.md'
    page.write_text('# Benchmarks\n\n## Contents\n\n- a\n\n## a\n\nold a\n\n## b\n\nold b\n')
    replace_section('a', 'new a\n', page)
    replace_section('c', 'new c', page)
    assert page.read_text() == ('# Benchmarks\n\n## Contents\n\n- a\n\n## a\n\nnew a\n\n'
                                '## b\n\nold b\n\n## c\n\nnew c\n')
