#!/usr/bin/env python
"""The shape plan for a corpus: ``w2v-plan-buckets`` (``w2v_stream/plan_buckets.py``)."""

import sys

from w2v_stream.plan_buckets import main

if __name__ == "__main__":
    sys.exit(main())
