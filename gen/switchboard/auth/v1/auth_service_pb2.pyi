from switchboard.auth.v1 import auth_pb2 as _auth_pb2
from switchboard.common.v1 import authority_pb2 as _authority_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
