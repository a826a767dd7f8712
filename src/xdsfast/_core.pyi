# Stub for the compiled peeker: the twin (_core_py.py) is the typed reference.
from xdsfast._core_py import STRING_LIMIT as STRING_LIMIT
from xdsfast._core_py import Buffer as Buffer
from xdsfast._core_py import DeltaRequestPeek as DeltaRequestPeek
from xdsfast._core_py import DeltaResponsePeek as DeltaResponsePeek
from xdsfast._core_py import RequestPeek as RequestPeek
from xdsfast._core_py import ResponsePeek as ResponsePeek
from xdsfast._core_py import ResponseScanner as ResponseScanner
from xdsfast._core_py import peek_delta_request as peek_delta_request
from xdsfast._core_py import peek_delta_response as peek_delta_response
from xdsfast._core_py import peek_request as peek_request
from xdsfast._core_py import peek_response as peek_response
