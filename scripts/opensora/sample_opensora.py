"""Open-Sora v1.0 / OpenDiT's sample script, same flags: a thin wrapper over `opendit sample`."""

from opendit.cli import exit_process
from opendit.sample import main

if __name__ == "__main__":
    exit_process(main() or 0)
