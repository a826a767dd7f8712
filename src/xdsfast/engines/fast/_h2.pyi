# Stub for the compiled HTTP/2 core: the twin, _h2_py.py, is its reference (the same API).
from xdsfast.engines.fast._h2_py import CONTROL_BURST as CONTROL_BURST
from xdsfast.engines.fast._h2_py import CONTROL_RATE as CONTROL_RATE
from xdsfast.engines.fast._h2_py import MESSAGE_COST as MESSAGE_COST
from xdsfast.engines.fast._h2_py import PREALLOC_MAX as PREALLOC_MAX
from xdsfast.engines.fast._h2_py import PREALLOC_UNREAD as PREALLOC_UNREAD
from xdsfast.engines.fast._h2_py import PREFACE as PREFACE
from xdsfast.engines.fast._h2_py import READ_SIZE as READ_SIZE
from xdsfast.engines.fast._h2_py import REPLY_BACKLOG as REPLY_BACKLOG
from xdsfast.engines.fast._h2_py import UNREAD_MAX as UNREAD_MAX
from xdsfast.engines.fast._h2_py import UNREAD_PROCESS_MAX as UNREAD_PROCESS_MAX
from xdsfast.engines.fast._h2_py import Assembler as Assembler
from xdsfast.engines.fast._h2_py import ConnCore as ConnCore
from xdsfast.engines.fast._h2_py import StreamCore as StreamCore
from xdsfast.engines.fast._h2_py import data_frames as data_frames
from xdsfast.engines.fast._h2_py import frame_header as frame_header
from xdsfast.engines.fast._h2_py import frame_u32 as frame_u32
from xdsfast.engines.fast._h2_py import unread_total as unread_total
