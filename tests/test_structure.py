"""The package's shape: every module imports on its own, no two modules import each other (even
inside functions), no stage reads a net's settings off the module, and the layout page
(docs/layout.md) names every module."""
import ast
import re
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / 'retina'
SCRIPTS = ('convert.py', 'train_nn.py', 'transform.py', 'blend.py', 'ram.py', 'predict.py')


def modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(REPO).with_suffix('').parts
        found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return found


def imports_of(path, known):
    """The package modules `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('retina'):
            found |= {name for name in (node.module, *(f'{node.module}.{a.name}'
                                                        for a in node.names)) if name in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    return found


def cycles(graph):
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_module_imports_alone():
    """Each module imported into an interpreter where no other module of the package was:
    a module that only works after another was imported first fails here."""
    code = ('import importlib, sys\n'
            'failed = []\n'
            f'for name in {sorted(modules())!r}:\n'
            '    for loaded in [m for m in sys.modules if m == "retina" or m.startswith("retina.")]:\n'
            '        del sys.modules[loaded]\n'
            '    try:\n'
            '        importlib.import_module(name)\n'
            '    except Exception as error:\n'
            '        failed.append(f"{name}: {type(error).__name__}: {error}")\n'
            'print("\\n".join(failed))\n'
            'sys.exit(1 if failed else 0)\n')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_no_two_modules_import_each_other():
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    assert sum(map(len, graph.values())) > 50, 'the import graph was not read'
    assert cycles(graph) == []


STAGES = ('core', 'data', 'model', 'train', 'features', 'blend', 'heatmaps', 'grade', 'publish')


def stage_of(name):
    """The stage of `retina.STAGE.x` (its index in STAGES), or None for the package's own
    top-level modules (the `python -m` entry points and the demo), which may import anything."""
    parts = name.split('.')
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else None


def layering_offences(graph):
    """'a -> b' for every import of a module from a later stage."""
    return sorted(f'{name} -> {other}' for name, imported in graph.items()
                  for other in imported
                  if stage_of(name) is not None and stage_of(other) is not None
                  and stage_of(other) > stage_of(name))


def test_imports_only_run_down_the_stages():
    """A stage imports only from itself and the stages before it: core before data, data
    before model, and so on to publish."""
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    assert layering_offences(graph) == []


def test_a_stage_importing_a_later_one_is_an_offence():
    graph = {'retina.core.paths': {'retina.data.images'}, 'retina.model.nets': {'retina.core.errors'},
             'retina.demo': {'retina.grade.predict'}}
    assert layering_offences(graph) == ['retina.core.paths -> retina.data.images']


def test_every_module_lives_in_a_stage_folder():
    """The package's top level holds only its entry points, each of which only calls main."""
    top = [name for name in modules() if name.count('.') == 1 and stage_of(name) is None]
    assert sorted(top) == ['retina.datasets', 'retina.demo', 'retina.export', 'retina.release',
                           'retina.stats', 'retina.synthetic']
    for name in top:
        if name == 'retina.demo':
            continue
        tree = ast.parse(modules()[name].read_text())
        code = [node for node in tree.body if not isinstance(node, ast.Expr)]
        assert len(code) == 2 and isinstance(code[0], ast.ImportFrom) and code[0].names[0].name == 'main'


def test_cycles_are_found_where_there_are_some():
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert cycles({'a': {'b'}, 'b': set()}) == []


def test_no_stage_reads_a_net_s_settings_off_the_module():
    """The pixel constants and the preprocessing come from checkpoint.LoadedNet, never from
    attributes hung on the nn.Module (a typo there silently fell back to a default)."""
    pattern = re.compile(r"getattr\([^)]*'(pixel_constants|preprocessing)'|\.pixel_constants\b")
    sources = [*modules().values(), *(REPO / s for s in SCRIPTS), *(REPO / 'bench').glob('*.py')]
    offenders = [f'{path.relative_to(REPO)}:{number}: {line.strip()}'
                 for path in sources
                 for number, line in enumerate(path.read_text().splitlines(), start=1)
                 if pattern.search(line)]
    assert offenders == []


def test_one_scoring_path_and_no_guessed_pixel_constants():
    """A trained net's input is prepared in retina/model/scoring.py (training's random
    augmentation aside: retina/train/loop.py hands `prepare_batch` to the epoch), and no
    function falls back to the Kaggle constants: every caller passes a net's own."""
    preparing = {'retina/model/augment.py', 'retina/model/scoring.py', 'retina/train/loop.py',
                 'bench/bench_train.py', 'bench/compare_revisions.py'}  # training's speed
    sources = [*modules().values(), *(REPO / s for s in SCRIPTS), *(REPO / 'bench').glob('*.py')]
    offenders = []
    for path in sources:
        name = str(path.relative_to(REPO))
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if ('prepare_batch(' in line and name not in preparing) or \
                    re.search(r'constants=None|constants or KAGGLE', line):
                offenders.append(f'{name}:{number}: {line.strip()}')
    assert offenders == []


def test_the_layout_page_names_every_module():
    page = REPO.joinpath('docs', 'layout.md').read_text()
    layout = page.split('## Layout', 1)[1].split('\n## ', 1)[0]
    listed = set(re.findall(r'\b(\w+)\.py\b', layout)) | set(re.findall(r'\b(\w+)/', layout))
    missing = [name for name in modules()
               if name != 'retina' and f"{name.rsplit('.', 1)[-1]}" not in listed]
    assert [stage for stage in STAGES if f'{stage}/' not in layout] == []
    assert missing == []


# Where a module with behaviour has no tests/test_<name>.py of its own, the test file that
# exercises it (it must import the module or run it by its dotted name).  A new module needs a
# test file, or a line here naming one that tests it.
TESTED_IN = {
    'retina.core.paths': 'test_data.py',
    'retina.core.plots': 'test_predict.py',
    'retina.core.precision': 'test_train.py',
    'retina.core.runtime': 'test_train.py',
    'retina.data.cache': 'test_data.py',
    'retina.data.conversion': 'test_convert.py',
    'retina.data.crop': 'test_preprocess.py',
    'retina.data.labels': 'test_data.py',
    'retina.data.preview': 'test_convert.py',
    'retina.model.feature_stats': 'test_gradability.py',
    'retina.model.inference': 'test_train.py',
    'retina.train.loop': 'test_train.py',
    'retina.train.runs': 'test_train.py',
    'retina.features.extract': 'test_transform.py',
    'retina.features.files': 'test_transform.py',
    'retina.blend.blending': 'test_blend.py',
    'retina.blend.files': 'test_blend.py',
    'retina.blend.fitted': 'test_predict.py',
    'retina.blend.fitting': 'test_blend.py',
    'retina.blend.reports': 'test_blend.py',
    'retina.blend.submission': 'test_predict.py',
    'retina.blend.net': 'test_blend.py',
    'retina.grade.grader': 'test_predict.py',
    'retina.grade.photos': 'test_predict.py',
    'retina.heatmaps': 'test_predict.py',
    'retina.heatmaps.methods': 'test_ram.py',
    'retina.heatmaps.figures': 'test_ram.py',
    'retina.heatmaps.scores': 'test_ram.py',
    'retina.publish.export': 'test_predict.py',
    'retina.publish.release': 'test_released.py',
    'retina.publish.chain': 'test_released.py',
    'retina.demo': 'test_pipeline.py',
}


def has_behaviour(path):
    """A module that defines a function or a class (not a shim that re-exports one)."""
    return any(isinstance(node, (ast.FunctionDef, ast.ClassDef))
               for node in ast.parse(path.read_text()).body)


def exercises(test_file, module):
    """Whether `test_file` imports `module` (anywhere in it) or runs it by its dotted name."""
    path = REPO / 'tests' / test_file
    if not path.exists():
        return False
    text = path.read_text()
    return module in imports_of(path, {module}) or re.search(rf'\b{re.escape(module)}\b', text)


def test_every_module_with_behaviour_has_a_test_file():
    known = modules()
    untested = []
    for name, path in known.items():
        if not has_behaviour(path) or name == 'retina':
            continue
        own = f"test_{name.rsplit('.', 1)[-1]}.py"
        if not (REPO / 'tests' / own).exists() and not exercises(TESTED_IN.get(name, own), name):
            untested.append(f'{name} (no tests/{own}; TESTED_IN names '
                            f'{TESTED_IN.get(name, "nothing")})')
    assert untested == []
    stale = [name for name in TESTED_IN if name not in known]
    assert stale == [], 'TESTED_IN names modules that are gone'


def test_a_module_without_a_test_file_is_found():
    assert not exercises('test_ram.py', 'retina.data.no_such_module')
    assert not exercises('no_such_test_file.py', 'retina.core.metrics')
    assert exercises('test_ram.py', 'retina.heatmaps.methods')
