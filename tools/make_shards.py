#!/usr/bin/env python
"""LibriSpeech or your own audio → shards: ``w2v-make-shards`` (``w2v_stream/make_shards.py``)."""

import sys

from w2v_stream.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
