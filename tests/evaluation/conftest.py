import os
import sys

# Lets the evaluation tests import the shared panoptic_data helpers.
sys.path.insert(0, os.path.dirname(__file__))
