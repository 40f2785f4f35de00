"""Errors a user can fix, and the wrapper that turns them into one-line messages.

Every script wraps its command with `handle_errors`: a `UserError`, a full
disk, an unwritable folder or Ctrl-C end the run with one line on stderr and
a non-zero exit status instead of a traceback.  `--debug` shows the traceback.
"""
import contextlib
import errno
import functools
import signal
import sys
import threading

import click


class UserError(Exception):
    """Something wrong with the user's input: the message says what and how to fix it."""


def first_few(items, shown=3, separator=', '):
    """'a, b, c and 4 more': what a message lists of many offending items."""
    items = [str(item) for item in items]
    more = f' and {len(items) - shown} more' if len(items) > shown else ''
    return separator.join(items[:shown]) + more


def shorten(text, width):
    """`text` cut to at most `width` characters at a word's end, with '…' where it was cut: a
    message quoting a library's error never stops mid-word."""
    text = ' '.join(str(text).split())
    if len(text) <= width:
        return text
    cut = text[:width - 1]
    return (cut.rsplit(' ', 1)[0] if ' ' in cut else cut) + '…'


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`) in a long command: ended like Ctrl-C, checkpoints left whole."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt():
    """While inside, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread, so that
    `kill PID` of a background run ends it as Ctrl-C does: its finally blocks run and it says
    how to go on.  (A shell starts background jobs with Ctrl-C ignored, so `kill` is how they
    are stopped.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

_WRITE_ERRNOS = {errno.ENOSPC: 'the disk is full', errno.EDQUOT: 'the disk quota is exceeded',
                 errno.EFBIG: 'the file size limit is reached',
                 errno.EACCES: 'permission denied', errno.EROFS: 'the file system is read-only',
                 errno.EPERM: 'operation not permitted'}


def os_error_message(error):
    """One line for an OSError that a user can act on."""
    where = f' {error.filename}' if getattr(error, 'filename', None) else ''
    reason = _WRITE_ERRNOS.get(error.errno, error.strerror or str(error))
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f'cannot write{where}: {reason}; free some space and run the command again'
    if error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f'cannot write{where}: {reason}; choose a folder you can write to'
    if error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f'cannot write{where}: {reason}; a file stands where a folder is needed'
    return f'{reason}:{where}'.rstrip(':')


class _Missing(dict):
    """Options for `str.format_map`; an option not given shows as its upper-case name."""

    def __getitem__(self, key):
        value = self.get(key)
        return key.upper() if value is None else value


def handle_errors(resume_hint=None):
    """Decorate a click command: add `--debug` and print user errors as one line.

    `resume_hint` is shown when the user presses Ctrl-C, e.g. how to resume; it may
    name the command's options, e.g. '{cnf}'.  Commands with one (the long ones) also end
    on SIGTERM as on Ctrl-C, with exit status 143.  Any other exception is a bug: one
    line that says so, and `--debug` for the traceback.
    """
    def decorate(command):
        @click.option('--debug', is_flag=True, help='Show full tracebacks instead of one-line errors.')
        @functools.wraps(command)
        def wrapper(*args, debug=False, **kwargs):
            try:
                with terminate_as_interrupt() if resume_hint else contextlib.nullcontext():
                    return command(*args, **kwargs)
            except (click.exceptions.ClickException, click.exceptions.Exit,
                    click.exceptions.Abort):
                raise  # click prints these itself
            except UserError as error:
                if debug:
                    raise
                click.echo(f'error: {error}', err=True)
                sys.exit(EXIT_USER_ERROR)
            except KeyboardInterrupt as error:
                if debug:
                    raise
                hint = f' {resume_hint.format_map(_Missing(kwargs))}' if resume_hint else ''
                click.echo(f'\ninterrupted.{hint}', err=True)
                sys.exit(EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED)
            except OSError as error:
                if debug:
                    raise
                click.echo(f'error: {os_error_message(error)}', err=True)
                sys.exit(1)
            except Exception as error:  # a bug, not the user's input: still no traceback
                if debug:
                    raise
                first = shorten((str(error).strip().splitlines() or [''])[0], 200)
                if isinstance(error, MemoryError) or 'out of memory' in first.lower():
                    click.echo(f'error: out of memory ({type(error).__name__}: {first}); use a '
                               f'smaller batch (--batch_size, or the config\'s '
                               f'batch_size_train) or --cache_on_device no', err=True)
                else:
                    click.echo(f'error: unexpected {type(error).__name__}: {first} (a bug: rerun '
                               f'with --debug for the traceback and report it)', err=True)
                sys.exit(1)
        return wrapper
    return decorate
