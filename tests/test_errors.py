"""retina.errors: every exception a script meets ends in one line and an exit status, never a
traceback."""
import pytest

from retina.core.errors import UserError


@pytest.mark.parametrize('raised, code, words', [
    (ValueError('odd\nsecond line'), 1, 'error: unexpected ValueError: odd (a bug: rerun with '
                                        '--debug'),
    (RuntimeError('CUDA out of memory. Tried to allocate 2 GiB'), 1, 'error: out of memory'),
    (UserError('data/x.csv: fix it'), 2, 'error: data/x.csv: fix it'),
    (KeyboardInterrupt(), 130, 'interrupted. Continue with: --cnf c_9'),
])
def test_every_exception_ends_in_one_line_without_a_traceback(raised, code, words):
    import click
    from click.testing import CliRunner

    from retina.core.errors import handle_errors

    @click.command()
    @click.option('--cnf')
    @handle_errors(resume_hint='Continue with: --cnf {cnf}')
    def command(cnf):
        raise raised

    result = CliRunner().invoke(command, ['--cnf', 'c_9'])
    assert result.exit_code == code
    assert words in result.output and 'Traceback' not in result.output
    assert len(result.output.strip().splitlines()) == 1
    debug = CliRunner().invoke(command, ['--cnf', 'c_9', '--debug'])
    assert isinstance(debug.exception, type(raised)) or code == 130


def test_messages_quoting_a_library_or_a_limit_are_whole(tmp_path, synthetic_source):
    """A refused pickle names the global it would run, never torch's advice cut mid-word; a
    photograph just over the pixel limit is not 'over the limit' by the same figure."""
    import os

    import torch
    from PIL import Image

    from conftest import one_line_error, run_script

    class Code:
        def __reduce__(self):
            return os.system, ('true',)

    torch.save({'format': 'retina-checkpoint-1', 'model': Code()}, tmp_path / 'code.pt')
    photo = sorted((synthetic_source / 'train').iterdir())[0]
    line = one_line_error(run_script('predict.py', photo, '--weights_from', tmp_path / 'code.pt',
                                     cwd=tmp_path, check=False),
                          'refused to load', 'pickled Python objects', 'GLOBAL posix.system')
    quoted = line[line.index('(') + 1:line.index(')')]
    assert quoted.endswith(('blocked', '…')) and ' fr' not in quoted, line
    Image.new('1', (10001, 10001)).save(tmp_path / 'huge.png')
    result = run_script('predict.py', photo, tmp_path / 'huge.png', '--weights_from',
                        'eyepacs-128', '--no_progress', cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    assert '100.02 MP; the limit is 100 MP' in result.stderr, result.stderr
