from switchboard.common.v1 import authority_pb2 as _authority_pb2
from switchboard.control.v1 import control_pb2 as _control_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
