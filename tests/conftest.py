import os
import sys

# Tests import the working tree, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("QVL_BACKENDS", None)  # a developer's shell setting must not change what the tests check
