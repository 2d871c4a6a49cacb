"""Running the command line in-process and checking how it reports a user error."""

from __future__ import annotations

from accullm_export.cli.main import main


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``accullm-export *argv`` run in-process."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code, err, needle):
    """Exit code 2 and exactly one message line (besides I/W log lines), no traceback, containing ``needle``."""
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("I ", "W "))]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0]
