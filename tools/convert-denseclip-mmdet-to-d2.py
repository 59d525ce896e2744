#!/usr/bin/env python
"""The converter's former name: runs tools/convert-denseclip-release-to-d2.py (detection and segmentation)."""
import os
import runpy

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert-denseclip-release-to-d2.py"),
                   run_name="__main__")
