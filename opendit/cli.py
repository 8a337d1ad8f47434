"""`opendit` command: one entry point, each subcommand owned by its module (its own flags and --help)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import NoReturn

COMMANDS = {
    "train": ("opendit.train", "train or fine-tune STDiT (works alone or under torchrun)"),
    "sample": ("opendit.sample", "generate videos from text prompts"),
    "app": ("opendit.app", "serve a web page and HTTP API for sampling (the [app] extra)"),
    "prepare": ("opendit.data.prepare", "prepare data: csv | filter | info | synthetic | cache"),
    "launch": ("opendit.launch", "start a multi-node run from a hostfile over ssh"),
    "export": ("opendit.export", "turn a training checkpoint into a model folder for sampling"),
    "calibrate": ("opendit.calibrate", "fit a model folder's TeaCache coefficients (into its pipeline.json)"),
}


def usage() -> str:
    lines = ["usage: opendit <command> [flags]   (opendit <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from opendit import __version__

        print(f"opendit {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"opendit: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


def exit_process(code: int) -> NoReturn:
    """End a command-line process with ``code``; a torchrun worker skips interpreter finalization.

    Why: gloo's worker threads outlive ``destroy_process_group`` while anything still references a group (torch's
    DTensor caches do after FSDP2). One that drops its last collective's work while the interpreter finalizes is
    killed taking the GIL, and the unwind aborts the process (SIGABRT, "terminate called without an active
    exception"): a finished run that torchrun reports as failed. Seen in the 2-4 process gloo tests; outputs are
    flushed and closed before this point.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run() -> NoReturn:
    """The ``opendit`` console script and ``python -m opendit``."""
    exit_process(main())


if __name__ == "__main__":
    run()
