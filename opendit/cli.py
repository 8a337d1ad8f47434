"""`opendit` command: one entry point, each subcommand owned by its module (its own flags and --help)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("opendit.train", "train or fine-tune STDiT (works alone or under torchrun)"),
    "sample": ("opendit.sample", "generate videos from text prompts"),
    "prepare": ("opendit.data.prepare", "prepare data: csv | filter | info | synthetic | cache"),
    "launch": ("opendit.launch", "start a multi-node run from a hostfile over ssh"),
    "export": ("opendit.export", "turn a training checkpoint into a model folder for sampling"),
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


if __name__ == "__main__":
    sys.exit(main())
