"""retina.errors: every exception a script meets ends in one line and an exit status, never a
traceback."""
import pytest

from retina.errors import UserError


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

    from retina.errors import handle_errors

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
