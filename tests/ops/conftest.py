import os
import sys

# Lets the op tests import the shared op_tester helpers.
sys.path.insert(0, os.path.dirname(__file__))
