"""How every script ends: `run_cli(main)` prints an error about bad input as one line and exits with code 2.

    if __name__ == "__main__":
        run_cli(main)

The errors raised for bad input (a data file, a flag, a checkpoint, a reward plugin) name the place (file:line,
sample, tensor, reward function) and what to do; a traceback around them only buries that line. Set
NANOVLM_DEBUG=1 to get the traceback anyway (a bug report wants it). Errors of other types (RuntimeError from
PyTorch, AssertionError, ...) are bugs or resource limits and keep their traceback.

Ctrl-C is one line too, exit code 130 (128 + SIGINT, as a shell reports it). Inside a training loop the first
Ctrl-C saves a checkpoint at the end of the step and says where (train_utils.StopOnCtrlC); elsewhere, or on a
second Ctrl-C, the script stops at once.
"""

import os
import sys

INPUT_ERRORS = (ValueError, OSError, KeyError, TypeError, FloatingPointError, SyntaxError, ImportError)


def run_cli(main):
    """Call main(); exit with its return value, or with 2 and `error: <message>` on stderr for an input error
    (130 and `interrupted: <message>` for Ctrl-C)."""
    if os.environ.get("NANOVLM_DEBUG", "") not in ("", "0"):
        sys.exit(main())
    try:
        code = main()
    except INPUT_ERRORS as e:
        # KeyError's str() is the repr of its argument (quotes and escaped newlines): show the message itself
        message = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
        print(f"error: {message or type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":   # under torchrun every process stops: one of them says why
            print(f"\ninterrupted{': ' if str(e) else ''}{e}", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
