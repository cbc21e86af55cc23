"""Console lines go through Python logging: process 0's reach stdout through the one handler the library
installs, other processes' nowhere, and a caller's own logging configuration is used instead of ours."""
import io
import logging

import pytest

from jaxinfra.core.log import ROOT, _Console, console


@pytest.fixture
def fresh_loggers():
    """The library's and the root logger as they were, whatever the test installs."""
    ours, root = logging.getLogger(ROOT), logging.getLogger()
    saved = (list(ours.handlers), ours.level, ours.propagate, list(root.handlers), root.level)
    ours.handlers.clear()
    yield ours, root
    ours.handlers[:], ours.propagate, root.handlers[:] = saved[0], saved[2], saved[3]
    ours.setLevel(saved[1])
    root.setLevel(saved[4])


def test_process_zero_prints_each_line_once(fresh_loggers, capsys):
    console(True)
    console(True)  # a second run in the same process installs nothing more
    logging.getLogger("jaxinfra.train.saver").info("resumed from step 3")
    assert capsys.readouterr().out == "resumed from step 3\n"


def test_other_processes_print_nothing(fresh_loggers, capsys):
    console(False)
    logging.getLogger("jaxinfra.lm.job").info("corpus stdlib")
    logging.getLogger("jaxinfra.train.trainer").warning("warning: no plots")
    assert capsys.readouterr().out == ""


def test_a_callers_logging_configuration_is_used_instead(fresh_loggers, capsys):
    ours, root = fresh_loggers
    mine = io.StringIO()
    root.addHandler(logging.StreamHandler(mine))  # what logging.basicConfig(stream=mine, level=logging.INFO) does
    root.setLevel(logging.INFO)
    console(True)
    logging.getLogger("jaxinfra.train.trainer").info("train step compiled in 1.0s")
    # no handler of ours (pytest attaches its capture handlers to a logger that does not propagate)
    assert not any(isinstance(h, _Console) for h in ours.handlers) and capsys.readouterr().out == ""
    assert mine.getvalue() == "train step compiled in 1.0s\n"


def test_a_handler_that_a_dependency_added_is_not_a_configuration(fresh_loggers, capsys):
    ours, root = fresh_loggers
    theirs = io.StringIO()
    root.addHandler(logging.StreamHandler(theirs))  # importing orbax or grain does this, root staying at WARNING
    root.setLevel(logging.WARNING)
    console(True)
    logging.getLogger("jaxinfra.train.trainer").info("train step compiled in 1.0s")
    assert capsys.readouterr().out == "train step compiled in 1.0s\n" and theirs.getvalue() == ""
