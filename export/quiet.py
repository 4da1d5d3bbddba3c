"""Keep third-party chatter (converter progress, C++ logs, library warnings) off the terminal.

torch.onnx warns about a missing torchvision, torchao prints failed kernel loads, litert-torch
prints a progress tree and its MLIR converter logs through glog straight to file descriptor 2,
so Python-level redirection does not catch it: the descriptors themselves are pointed at a
temporary file while an export runs. `edgelearn export -v` passes everything through.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """Silence fds 1 and 2, sys.stdout/stderr, logging and warnings inside the block.

    Args:
        verbose: when True nothing is redirected (the `-v` flag).
    """
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        # sys.stdout/stderr too: under a test runner they are not the descriptors.
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            # Handlers made before the block keep their own stream; silence them at the source.
            logging.disable(logging.CRITICAL)
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                logging.disable(logging.NOTSET)
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])
