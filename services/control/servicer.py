"""ControlService: operators' view and levers of the replicas, proto in, supervisor call,
proto out. Who may call it (operators) and the requests' shape are the contract's,
checked by the runtime before any handler here runs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from switchboard.control.v1 import control_pb2 as pb
from switchboard.control.v1 import control_service_pb2_grpc

from services.control.events import ControlEvent, EventBus
from services.control.supervisor import Replica, State, Supervisor
from services.control.xds import XdsServer

logger = logging.getLogger(__name__)

_STATES = {state: pb.ReplicaState.Value(f"REPLICA_STATE_{state.name}") for state in State}


def replica_message(supervisor: Supervisor, replica: Replica) -> pb.Replica:
    host, port = supervisor.kinds[replica.kind].address(replica.slot)
    running = replica.record is not None and replica.started_at > 0
    uptime = duration_pb2.Duration()
    if running:
        uptime.FromNanoseconds(int((time.time() - replica.started_at) * 1e9))
    return pb.Replica(
        name=replica.name,
        service=replica.kind,
        address=f"{host}:{port}",
        state=_STATES[replica.state],
        restarts=replica.restarts,
        uptime=uptime,
        pid=replica.record.pid if replica.record is not None else 0,
        generation=replica.generation,
        last_log=replica.last_log,
    )


def event_message(event: ControlEvent) -> pb.ControlEvent:
    at = timestamp_pb2.Timestamp()
    at.FromNanoseconds(int(event.time * 1e9))
    return pb.ControlEvent(
        time=at,
        replica=event.replica,
        service=event.service,
        kind=event.kind,
        message=event.message,
        config_version=event.config_version,
    )


class ControlServicer(control_service_pb2_grpc.ControlServiceServicer):
    def __init__(self, supervisor: Supervisor, xds: XdsServer, events: EventBus) -> None:
        self._supervisor = supervisor
        self._xds = xds
        self._events = events

    def _messages(self, replicas: list[Replica]) -> list[pb.Replica]:
        return [replica_message(self._supervisor, r) for r in replicas]

    async def ListReplicas(  # noqa: N802 - gRPC method name
        self, request: pb.ListReplicasRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReplicasResponse:
        if request.service:
            self._supervisor.check_kind(request.service, scalable=False)
        replicas = sorted(
            (
                r
                for r in self._supervisor.replicas.values()
                if not request.service or r.kind == request.service
            ),
            key=lambda r: (r.kind, r.slot),
        )
        nodes = []
        for node in self._xds.status():
            acked = [t.acked_version or 0 for t in node.types.values()]
            nack = node.last_nack
            nodes.append(
                pb.EnvoyNode(
                    node_id=node.node_id,
                    connected=node.connected,
                    acked_version=min(acked) if len(acked) == 4 else 0,
                    last_rejection=f"version {nack.version}: {nack.message}" if nack else "",
                )
            )
        return pb.ListReplicasResponse(
            replicas=self._messages(replicas),
            config_version=self._xds.version,
            envoy_nodes=nodes,
        )

    async def ScaleService(  # noqa: N802 - gRPC method name
        self, request: pb.ScaleServiceRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScaleServiceResponse:
        replicas = await self._supervisor.scale(request.service, request.replicas)
        return pb.ScaleServiceResponse(replicas=self._messages(replicas))

    async def RolloutService(  # noqa: N802 - gRPC method name
        self, request: pb.RolloutServiceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutServiceResponse:
        replicas = await self._supervisor.rollout(request.service)
        return pb.RolloutServiceResponse(replicas=self._messages(replicas))

    async def StopReplica(  # noqa: N802 - gRPC method name
        self, request: pb.StopReplicaRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopReplicaResponse:
        replica = await self._supervisor.stop_replica(request.replica)
        return pb.StopReplicaResponse(replica=replica_message(self._supervisor, replica))

    async def StartReplica(  # noqa: N802 - gRPC method name
        self, request: pb.StartReplicaRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartReplicaResponse:
        replica = await self._supervisor.start_replica(request.replica, request.environment)
        return pb.StartReplicaResponse(replica=replica_message(self._supervisor, replica))

    async def WatchEvents(  # noqa: N802 - gRPC method name
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        async for event in self._events.watch():
            yield pb.WatchEventsResponse(event=event_message(event))
