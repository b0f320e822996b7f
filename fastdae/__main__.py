"""`python -m fastdae ...`: see fastdae.cli. The OpenMP spin is chosen first, before anything
imports torch (libgomp reads it once, at start-up): fastdae.threads.prepare_env, docs/cpu.md."""

import sys

from fastdae.threads import prepare_env

try:
    prepare_env()
except ValueError as err:  # a bad FASTDAE_SPIN: one line, the usage-error status
    print(f"fastdae: {err}", file=sys.stderr)
    sys.exit(2)

from fastdae.cli import main  # noqa: E402  (after the spin is set)

sys.exit(main())
