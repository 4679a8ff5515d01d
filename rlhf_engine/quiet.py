"""``--quiet`` for the libraries the commands call: transformers' progress bars and messages.

transformers 5.x draws a "Loading weights" tqdm bar on stderr for every ``from_pretrained``
of a saved folder; our own bars (``RunLog``) are switched off separately, by their ``quiet``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers(quiet: bool = True) -> Iterator[None]:
    """Within the block, transformers draws no progress bar and logs errors only (with
    ``quiet`` False, nothing changes). Both switches (``transformers.utils.logging``'s
    progress-bar flag and verbosity) are process-wide, so they are put back as they were on
    exit, also when the block raises."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
