"""`python -m tests.channel`: build (or find) the cached test channel and print its path."""

import sys

from tests.channel import build_test_channel


def main() -> int:
    path = build_test_channel(log=lambda line: print(line, file=sys.stderr, flush=True))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
