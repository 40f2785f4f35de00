"""Errors a user can fix, and the wrapper that turns them into one-line messages.

Every script wraps its command with `handle_errors`: a `UserError`, a full
disk, an unwritable folder or Ctrl-C end the run with one line on stderr and
a non-zero exit status instead of a traceback.  `--debug` shows the traceback.
"""
import errno
import functools
import sys

import click


class UserError(Exception):
    """Something wrong with the user's input: the message says what and how to fix it."""


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

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


def handle_errors(resume_hint=None):
    """Decorate a click command: add `--debug` and print user errors as one line.

    `resume_hint` is shown when the user presses Ctrl-C, e.g. how to resume.
    """
    def decorate(command):
        @click.option('--debug', is_flag=True, help='Show full tracebacks instead of one-line errors.')
        @functools.wraps(command)
        def wrapper(*args, debug=False, **kwargs):
            try:
                return command(*args, **kwargs)
            except UserError as error:
                if debug:
                    raise
                click.echo(f'error: {error}', err=True)
                sys.exit(EXIT_USER_ERROR)
            except KeyboardInterrupt:
                if debug:
                    raise
                hint = f' {resume_hint}' if resume_hint else ''
                click.echo(f'\ninterrupted.{hint}', err=True)
                sys.exit(EXIT_INTERRUPTED)
            except OSError as error:
                if debug:
                    raise
                click.echo(f'error: {os_error_message(error)}', err=True)
                sys.exit(1)
        return wrapper
    return decorate
