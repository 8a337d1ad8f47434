"""Open-Sora v1.0 / OpenDiT's sample script, same flags: a thin wrapper over `opendit sample`."""

import sys

from opendit.sample import main

if __name__ == "__main__":
    sys.exit(main())
