# Stub for the compiled route core; kept in step with _route_py.py's signatures.
from xdsfast._route_py import ByteTotals as ByteTotals
from xdsfast._route_py import Latencies as Latencies
from xdsfast._route_py import RouteCore as RouteCore
from xdsfast._route_py import Tally as Tally
from xdsfast._route_py import TypeState as TypeState
