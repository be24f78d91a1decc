"""``python -m pipeline.tracking flush <journal dir> <tracking uri>``: log a journal
(:func:`pipeline.tracking.journal.flush_journal`); what an all-cached invocation starts detached."""

import logging
import sys
from pathlib import Path

from pipeline.tracking.journal import flush_journal

if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "flush":
        logging.basicConfig(level=logging.WARNING)
        flush_journal(Path(sys.argv[2]), sys.argv[3])
    else:
        sys.exit("usage: python -m pipeline.tracking flush <journal dir> <tracking uri>")
