"""One family of errors for the library and its commands, each kind with its exit code.

Every problem a user can cause or run into is a ``LopJaxError`` whose message is one line: what
is wrong and, where there is a remedy, what to do. A command (``lop_jax.cli.entry_point``) prints
it as ``error: <message>`` on stderr and exits with the class's ``exit_code``; the same codes hold
for every command:

    0    done
    1    ``CommandFailed``: the work started but failed, or had nothing to do (a non-finite loss,
         a write that failed, no finished run to analyse); ``scaled_sweep --check`` also exits 1
         when a criterion fails
    2    ``InputError``: the input was refused before any work (a config, a ``--set`` or index
         value, the data set, a results or export folder that is missing, unreadable or of
         another config); argparse's usage errors exit 2 as well
    130  ``Interrupted``: stopped by SIGINT/SIGTERM (printed as ``interrupted: <message>``);
         running the same command again resumes

The library's own classes (``ConfigError``, ``DataError``, ``AnalysisError``, ``PlotError``,
``CheckpointMismatch``, ``RunError``, ``RunInterrupted``) derive from these and keep their older
base (``ValueError`` or ``RuntimeError``), so ``except ValueError`` code still catches them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130


class LopJaxError(Exception):
    """Base of every lop-jax error; ``exit_code`` is what a command exits with."""

    exit_code: int = EXIT_FAILED
    label: str = "error"

    def one_line(self) -> str:
        """The message on one line (runs of whitespace, newlines included, become one space)."""
        return " ".join(str(self).split()) or type(self).__name__


class CommandFailed(LopJaxError):
    """The work started but failed, or there was nothing to do."""

    exit_code = EXIT_FAILED


class InputError(LopJaxError):
    """The input (config, options, data, results folder) was refused before any work."""

    exit_code = EXIT_INPUT


class Interrupted(LopJaxError):
    """Stopped on request (SIGINT/SIGTERM); the same command resumes."""

    exit_code = EXIT_INTERRUPTED
    label = "interrupted"
