"""Entry point: parses arguments, configures logging, maps the kit's errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading

from accullm_export import __version__
from accullm_export.cli.arg_types import CommandParser, one_line
from accullm_export.resources import return_freed_memory
from accullm_export.errors import AccuLLMError, Terminated

# name -> module; each module has HELP, add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "export": "accullm_export.cli.export",
    "generate": "accullm_export.cli.generate",
    "inspect": "accullm_export.cli.inspect_cmd",
    "calibrate": "accullm_export.cli.calibrate",
    "validate": "accullm_export.cli.validate",
    "presets": "accullm_export.cli.presets",
    "quantize": "accullm_export.cli.quantize",
    "sparsify": "accullm_export.cli.sparsify",
    "targets": "accullm_export.cli.targets",
    "build": "accullm_export.cli.build",
    "rehearse": "accullm_export.cli.rehearse",
    "check-trt": "accullm_export.cli.check_trt",
}

log = logging.getLogger("accullm_export")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="accullm-export",
        description="Export LLMs to ONNX with a KV cache, keep outlier channels exact, build for ONNX Runtime "
                    "and TensorRT targets.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0,
                           help="debug log output, Polygraphy's own log included")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname).1s %(message)s" if verbose < 2
                                           else "%(levelname).1s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated while the command runs, so staging folders are removed as on Ctrl-C; left alone
    where SIGTERM is ignored on purpose or this is not the main thread (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    return_freed_memory()
    try:
        with _sigterm_raises():
            return int(args.handler(args) or 0)
    except AccuLLMError as exc:
        print(f"accullm-export {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader (``| head``) closed the pipe: stop quietly, as command-line tools do
        sys.stdout = None
        return 141


if __name__ == "__main__":
    sys.exit(main())
