import os
import sys

# Tests import helpers (tests/distributed.py) as top-level modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
