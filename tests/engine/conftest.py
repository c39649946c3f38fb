import os
import sys

# Lets the engine tests (and the scripts they start under torchrun) import the toy model and data.
sys.path.insert(0, os.path.dirname(__file__))
