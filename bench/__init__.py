"""Helpers of `scripts/bench`: the harness, the pyfuse3 passthrough it compares with, archive builders."""
