# Stub for the compiled DNS name table; kept in step with _dnstable_py.py's signatures.
from xdsfast._dnstable_py import MAX_SECTION as MAX_SECTION
from xdsfast._dnstable_py import ROTATIONS as ROTATIONS
from xdsfast._dnstable_py import CompiledTable as CompiledTable
from xdsfast._dnstable_py import accepted as accepted
from xdsfast._dnstable_py import build as build
