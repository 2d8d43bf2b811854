"""Fuzzing the mesh: generated requests for every public RPC, sent through Envoy's public
port, and what the mesh must never do with them.

`fuzz` draws each RPC's cases from `tests.fuzzing` (from nothing, from a valid request
with a few fields changed, or as malformed bytes) in a process of its own, while its
`FuzzRun` sends the previous round's with a short deadline (a streamed request as a
few messages, a streamed response read a few messages deep) and keeps every call that
ended INTERNAL or UNKNOWN, or whose reply carried such a status for one of its items.
The mesh's processes must all be the ones running before (`processes`) and healthy
afterwards (`unhealthy`).

The cases act as tenants of their own (`FuzzTenants`): what a case creates is that
tenant's (sessions, tasks, documents, keys), what it can cheaply undo is undone at the
end (`FuzzRun.clean_up`), and operator RPCs that write (policies, keys) are pinned to
the run's second tenant. Shared by `tests/integration/test_fuzz.py` (bounded, in
`make test`) and `bench/fuzz.py` (the longer run).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import random
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool, message, message_factory, text_format
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from switchboard.auth.v1 import auth_pb2
from switchboard.chat.v1 import chat_pb2
from switchboard.execution.v1 import execution_pb2

from services.launcher import service_processes
from services.runtime import HTTP_HEALTH_PATH, Principal, method_contract, public_services
from tests import fuzzing

logger = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]

FAILURES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
"""What no call may end with, whatever it sent."""
DEADLINE_S = 3.0
"""Each case's deadline."""
STREAM_READS = 3
"""A streamed response is read this many messages deep, then the call is cancelled."""
STREAM_WRITES = 4
"""A streamed request is at most this many messages."""
RAW_SHARE = 5
"""One case in this many sends malformed bytes rather than a message."""
OPERATOR_SHARE = 4
"""One call in this many of an RPC both principals may call comes from an operator."""

WRITING_OPERATOR_RPCS = frozenset(
    {
        "switchboard.admission.v1.AdmissionService.UpdatePolicy",
        "switchboard.admission.v1.AdmissionService.DeletePolicy",
        "switchboard.auth.v1.KeyService.CreateKey",
    }
)
"""Operator RPCs that write a tenant's state: their tenant fields name the run's own
second tenant, whatever was drawn."""


def public_methods() -> list[descriptor.MethodDescriptor]:
    pool = descriptor_pool.Default()
    return [m for s in public_services() for m in pool.FindServiceByName(s).methods]


@dataclass(frozen=True)
class FuzzTenants:
    """Who the cases act as: metadata makers for the run's tenant and an operator."""

    tenant: str
    """The run's tenant, whose API key tenant calls carry."""
    operated: str
    """The tenant operator RPCs that write act on."""
    as_tenant: Callable[[str], Metadata]
    as_operator: Callable[[str], Metadata]
    """An operator's metadata acting on a tenant (its `x-tenant-id`)."""


@dataclass(frozen=True)
class Case:
    method: descriptor.MethodDescriptor
    requests: tuple[bytes, ...]
    """One request, or a client stream's messages, serialized (or malformed)."""
    operator: bool
    malformed: tuple[bool, ...] = ()
    """Which of `requests` were drawn as malformed bytes rather than as messages."""

    def shown(self) -> str:
        if not self.requests:
            return "(no messages)"
        cls = message_factory.GetMessageClass(self.method.input_type)
        flags = self.malformed or (True,) * len(self.requests)
        return " | ".join(
            shown(raw if bad else cls.FromString(raw))
            for raw, bad in zip(self.requests, flags, strict=True)
        )


@dataclass(frozen=True)
class Finding:
    method: str
    code: str
    message: str
    request: str

    def __str__(self) -> str:
        return f"{self.method}: {self.code} {self.message!r}\n    request: {self.request}"


@dataclass
class Tally:
    cases: Counter[str] = field(default_factory=Counter)
    """Cases sent per RPC (its full name)."""
    codes: Counter[str] = field(default_factory=Counter)
    """How the calls ended, by status code name."""
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.cases.values())


def summary(findings: Sequence[Finding], *, limit: int = 40) -> str:
    """The findings grouped by RPC, outcome and message (numbers and ids blanked), each
    group with its count and one request that produced it."""
    import re

    groups: dict[tuple[str, str, str], list[Finding]] = {}
    for f in findings:
        key = (f.method, f.code, re.sub(r"[0-9a-f]{6,}|\d+", "#", f.message)[:160])
        groups.setdefault(key, []).append(f)
    ordered = sorted(groups.values(), key=len, reverse=True)
    lines = [f"{len(findings)} calls ended INTERNAL or UNKNOWN, {len(groups)} kinds:"]
    for group in ordered[:limit]:
        lines.append(f"  {len(group)} x {group[0]}")
    if len(ordered) > limit:
        lines.append(f"  ... and {len(ordered) - limit} more kinds")
    return "\n".join(lines)


def shown(request: message.Message | bytes, limit: int = 600) -> str:
    """A request as a finding quotes it: text format, or the bytes as Python writes them."""
    if isinstance(request, bytes):
        text = f"bytes {request!r}"
    else:
        text = f"{type(request).__name__} {{{_one_line(request)}}}"
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


def _one_line(request: message.Message) -> str:
    return text_format.MessageToString(request, as_one_line=True, as_utf8=True)


# -- drawing the cases --------------------------------------------------------------------------


def draw(strategy: st.SearchStrategy[Any], count: int, *, seed: int) -> list[Any]:
    """`count` examples of `strategy` (fewer when it has no more distinct ones), drawn by
    Hypothesis's generation phase alone: no shrinking, no example database."""
    found: list[Any] = []

    @settings(
        max_examples=count,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @hypothesis_seed(seed)
    @given(strategy)
    def collect(example: Any) -> None:
        found.append(example)

    collect()
    return found


def case_strategy(
    method: descriptor.MethodDescriptor,
    seeds: Sequence[message.Message],
    *,
    hints: tuple[str, ...] = (),
) -> st.SearchStrategy[tuple[message.Message | bytes, ...]]:
    """One case's request(s) for `method`: a message drawn from nothing or from a seed,
    one time in RAW_SHARE malformed bytes; a short list of them for a client stream."""
    raw = fuzzing.raw_requests(method.input_type)
    drawn = fuzzing.requests(method.input_type, tuple(seeds), hints=hints)
    item = st.integers(0, RAW_SHARE - 1).flatmap(lambda n: raw if n == 0 else drawn)
    if method.client_streaming:
        return st.lists(item, max_size=STREAM_WRITES).map(tuple)
    return item.map(lambda r: (r,))


def cases_for(
    method: descriptor.MethodDescriptor,
    count: int,
    seeds: Sequence[message.Message],
    *,
    seed: int,
    hints: tuple[str, ...] = (),
) -> list[Case]:
    """`count` cases of `method` (fewer when its strategy runs out of distinct ones)."""
    drawn = draw(case_strategy(method, seeds, hints=hints), count, seed=seed)
    principals = method_contract(method.full_name).principals
    both = Principal.TENANT in principals and Principal.OPERATOR in principals
    rng = random.Random(seed)
    return [
        Case(
            method,
            tuple(r if isinstance(r, bytes) else r.SerializeToString() for r in requests),
            operator=Principal.TENANT not in principals
            or (both and rng.randrange(OPERATOR_SHARE) == 0),
            malformed=tuple(isinstance(r, bytes) for r in requests),
        )
        for requests in drawn
    ]


WireCase = tuple[str, tuple[bytes, ...], bool, tuple[bool, ...]]
"""A Case as it crosses from the drawing process: the method's full name for its
descriptor."""


def draw_round(
    method_names: Sequence[str],
    count: int,
    seeds: dict[str, list[bytes]],
    *,
    seed: int,
    hints: tuple[str, ...],
) -> list[WireCase]:
    """`count` cases of each method, shuffled together. Run in a process of its own:
    Hypothesis checks that nothing else touches the `random` module while it draws,
    which the sending (grpc, asyncio) in this process would."""
    pool = descriptor_pool.Default()
    cases: list[WireCase] = []
    for index, name in enumerate(method_names):
        method = pool.FindMethodByName(name)
        cls = message_factory.GetMessageClass(method.input_type)
        method_seeds = [cls.FromString(raw) for raw in seeds.get(name, [])]
        for case in cases_for(method, count, method_seeds, seed=seed + index, hints=hints):
            cases.append((name, case.requests, case.operator, case.malformed))
    random.Random(seed).shuffle(cases)
    return cases


def seed_requests(
    tenant: str, *, session_id: str, task_id: str
) -> dict[str, list[message.Message]]:
    """Valid requests of each RPC (`test_conformance.VALID`, Converse's other frames
    among them) naming the run's tenant and, where an RPC takes one, a session or task
    of that tenant: their mutants get past validation, to the services' own logic."""
    from tests.integration import test_conformance as conformance

    seeds: dict[str, list[message.Message]] = {}
    for name, make in conformance.VALID.items():
        service = name.rpartition(".")[0]
        real_id = session_id if service.endswith("ChatService") else task_id
        replaced = {conformance.TENANT: tenant, conformance.SOME_ID: real_id}
        requests = [make()]
        if name.endswith("ChatService.Converse"):
            requests += [frame() for frame in conformance.CONVERSE_FRAMES]
        for request in requests:
            _replace_strings(request, replaced)
        seeds[name] = requests
    return seeds


def _replace_strings(request: message.Message, replaced: dict[str, str]) -> None:
    for fd, value in request.ListFields():
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue
        if fd.type == fd.TYPE_STRING:
            if fd.is_repeated:
                value[:] = [replaced.get(v, v) for v in value]
            elif value in replaced:
                setattr(request, fd.name, replaced[value])
        elif fd.message_type is not None:
            for item in value if fd.is_repeated else (value,):
                _replace_strings(item, replaced)


# -- sending them -------------------------------------------------------------------------------


def _statuses(reply: message.Message) -> Iterable[status_pb2.Status]:
    """Every google.rpc.Status inside a reply (an item's outcome: an ingested document's,
    a task's of a batch, a refused admission, an error frame)."""
    for fd, value in reply.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        for item in value if fd.is_repeated else (value,):
            if isinstance(item, status_pb2.Status):
                yield item
            else:
                yield from _statuses(item)


class FuzzRun:
    """Sends cases to Envoy's public port and tallies what happened: client-streaming
    calls on `blocking`, the others on `channel` (two channels to the same target)."""

    def __init__(
        self, channel: grpc.aio.Channel, blocking: grpc.Channel, tenants: FuzzTenants
    ) -> None:
        self.channel = channel
        self._blocking = blocking
        self.tenants = tenants
        self.tally = Tally()
        self.created_sessions: set[str] = set()
        self.created_tasks: set[str] = set()
        self.created_keys: set[str] = set()
        self.granted_leases: set[str] = set()
        """Admission leases granted to the run's tenant: each holds a slot of its tier's
        ceiling, which other tenants share, until released (or for 10 minutes)."""

    def metadata(self, case: Case) -> Metadata:
        if case.operator:
            return self.tenants.as_operator(self.tenants.operated)
        return self.tenants.as_tenant(self.tenants.tenant)

    def _prepared(self, case: Case) -> list[bytes]:
        if case.method.full_name not in WRITING_OPERATOR_RPCS:
            return list(case.requests)
        return [self._pinned(case.method, raw) for raw in case.requests]

    def _pinned(self, method: descriptor.MethodDescriptor, raw: bytes) -> bytes:
        """`raw` naming the run's operated tenant, if it parses (otherwise it is refused
        before anything is written)."""
        cls = message_factory.GetMessageClass(method.input_type)
        try:
            request = cls.FromString(raw)
        except message.DecodeError:
            return raw
        _set_tenant(request, self.tenants.operated)
        return request.SerializeToString()

    async def send(self, case: Case) -> None:
        name = case.method.full_name
        self.tally.cases[name] += 1
        code, details, replies = await self.call(case)
        self.tally.codes[code.name] += 1
        problems = [(code.name, details)] if code in FAILURES else []
        response = message_factory.GetMessageClass(case.method.output_type)
        for raw in replies:
            try:
                reply = response.FromString(raw)
            except message.DecodeError:
                problems.append(("UNPARSABLE_REPLY", raw[:80].hex()))
                continue
            self._remember(reply)
            for status in _statuses(reply):
                if status.code in (c.value[0] for c in FAILURES):
                    problems.append((f"item {grpc.StatusCode(status.code).name}", status.message))
        for what, text in problems:
            request = case.shown()
            by = "operator" if case.operator else "tenant"
            self.tally.findings.append(Finding(f"{name} as {by}", what, text, request))

    async def call(self, case: Case) -> tuple[grpc.StatusCode, str, list[bytes]]:
        """Sends one case: how the call ended, and the replies read (serialized)."""
        method = case.method
        path = f"/{method.containing_service.full_name}/{method.name}"
        metadata = self.metadata(case)
        payload = self._prepared(case)
        if method.client_streaming:
            return await asyncio.to_thread(
                self._client_stream, path, payload, metadata, method.server_streaming
            )
        replies: list[bytes] = []
        call: Any = None
        try:
            if not method.server_streaming:
                call = self.channel.unary_unary(path)(
                    payload[0], metadata=metadata, timeout=DEADLINE_S
                )
                replies.append(await call)
                return grpc.StatusCode.OK, "", replies
            call = self.channel.unary_stream(path)(
                payload[0], metadata=metadata, timeout=DEADLINE_S
            )
            while len(replies) < STREAM_READS:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    return await call.code(), await call.details() or "", replies
                replies.append(reply)
            call.cancel()
            return grpc.StatusCode.OK, "", replies
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or "", replies
        except asyncio.CancelledError:
            if call is not None:
                call.cancel()
            raise

    def _client_stream(
        self, path: str, payload: list[bytes], metadata: Metadata, server_streaming: bool
    ) -> tuple[grpc.StatusCode, str, list[bytes]]:
        """A client-streaming call, on the blocking API: grpc's asyncio client reports a
        write that fails because the server already ended the call (having refused a
        message, with its own status) as INTERNAL "Internal error from Core", in place
        of the server's status (grpc/grpc#36066); the blocking client keeps the status."""
        replies: list[bytes] = []
        try:
            if not server_streaming:
                reply = self._blocking.stream_unary(path)(
                    iter(payload), metadata=metadata, timeout=DEADLINE_S
                )
                return grpc.StatusCode.OK, "", [reply]
            call = self._blocking.stream_stream(path)(
                iter(payload), metadata=metadata, timeout=DEADLINE_S
            )
            for reply in call:
                replies.append(reply)
                if len(replies) >= STREAM_READS:
                    call.cancel()
                    return grpc.StatusCode.OK, "", replies
            return call.code(), call.details() or "", replies
        except grpc.RpcError as err:
            return err.code(), err.details() or "", replies  # type: ignore[attr-defined]

    def _remember(self, reply: message.Message) -> None:
        """Notes what a reply says was created, for `clean_up`."""
        self.granted_leases.update(_leases(reply))
        if isinstance(reply, chat_pb2.CreateSessionResponse) and reply.session.session_id:
            self.created_sessions.add(reply.session.session_id)
        elif isinstance(reply, execution_pb2.SubmitTaskResponse) and reply.task.task_id:
            self.created_tasks.add(reply.task.task_id)
        elif isinstance(reply, execution_pb2.SubmitTasksResponse):
            self.created_tasks |= {
                r.submitted.task.task_id for r in reply.results if r.submitted.task.task_id
            }
        elif isinstance(reply, auth_pb2.CreateKeyResponse) and reply.key.key_id:
            self.created_keys.add(reply.key.key_id)

    async def run(self, cases: Sequence[Case], *, concurrency: int) -> None:
        """Sends `cases`, `concurrency` at a time."""
        queue = iter(cases)
        started = time.monotonic()

        async def worker() -> None:
            for case in queue:
                await self.send(case)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.tally.seconds += time.monotonic() - started

    async def clean_up(self) -> None:
        """Releases the leases, cancels the tasks, deletes the sessions and revokes the
        keys the cases were given."""
        from switchboard.admission.v1 import admission_pb2, admission_service_pb2_grpc
        from switchboard.auth.v1 import auth_service_pb2_grpc
        from switchboard.chat.v1 import chat_service_pb2_grpc
        from switchboard.execution.v1 import execution_service_pb2_grpc

        tenant = self.tenants.as_tenant(self.tenants.tenant)
        operator = self.tenants.as_operator(self.tenants.operated)
        chat = chat_service_pb2_grpc.ChatServiceStub(self.channel)
        execution = execution_service_pb2_grpc.ExecutionServiceStub(self.channel)
        keys = auth_service_pb2_grpc.KeyServiceStub(self.channel)
        admission = admission_service_pb2_grpc.AdmissionServiceStub(self.channel)
        undo = [
            admission.Release(
                admission_pb2.ReleaseRequest(lease_id=lease), metadata=tenant, timeout=10
            )
            for lease in self.granted_leases
        ]
        undo += [
            execution.CancelTask(
                execution_pb2.CancelTaskRequest(task_id=t), metadata=tenant, timeout=10
            )
            for t in self.created_tasks
        ]
        undo += [
            chat.DeleteSession(
                chat_pb2.DeleteSessionRequest(session_id=s), metadata=tenant, timeout=10
            )
            for s in self.created_sessions
        ]
        undo += [
            keys.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=k), metadata=operator, timeout=10)
            for k in self.created_keys
        ]
        for start in range(0, len(undo), 16):
            await asyncio.gather(*undo[start : start + 16], return_exceptions=True)


def _leases(reply: message.Message) -> Iterable[str]:
    """The ids of the admission leases inside a reply (Admit's, an AdmitSession
    admission's, ...)."""
    if reply.DESCRIPTOR.full_name == "switchboard.admission.v1.Lease":
        if reply.lease_id:  # type: ignore[attr-defined]
            yield reply.lease_id  # type: ignore[attr-defined]
        return
    for fd, value in reply.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        for item in value if fd.is_repeated else (value,):
            yield from _leases(item)


def _set_tenant(request: message.Message, tenant: str) -> None:
    """Every set or settable `tenant_id` field in `request` (and its set sub-messages)."""
    for fd in request.DESCRIPTOR.fields:
        if fd.name == "tenant_id" and fd.type == fd.TYPE_STRING and not fd.is_repeated:
            setattr(request, fd.name, tenant)
    for fd, value in request.ListFields():
        if fd.message_type is not None and not fd.is_repeated:
            _set_tenant(value, tenant)


def fuzz_tenants(
    as_tenant: Callable[[str], Metadata], as_operator: Callable[[str], Metadata]
) -> FuzzTenants:
    """Two new tenants for a run: the one its tenant calls act as, and the one its
    writing operator calls act on."""
    suffix = uuid.uuid4().hex[:8]
    return FuzzTenants(
        tenant=f"fuzz-{suffix}",
        operated=f"fuzz-{suffix}-operated",
        as_tenant=as_tenant,
        as_operator=as_operator,
    )


# -- the mesh afterwards ------------------------------------------------------------------------


def processes(mesh: Any) -> dict[str, tuple[int, float]]:
    """Every process of the mesh, by name: its PID and start time, while it runs."""
    return {r.name: (r.pid, r.created) for r, alive in mesh.status() if alive}


def unhealthy(mesh: Any) -> list[str]:
    """Every service replica (on its own port) and public service (through Envoy) that
    does not report SERVING, with why."""
    names = {r.name for r in mesh.records()}
    problems = []
    for spec, slot in service_processes(mesh.config):
        name = spec.process_name(mesh.config, slot)
        if name not in names:
            continue
        target = f"{mesh.config.host}:{spec.port(mesh.config, slot)}"
        try:
            if spec.http:
                url = f"http://{target}{HTTP_HEALTH_PATH}"
                with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310 - loopback
                    ok = reply.status == 200
            else:
                ok = _serving(target, spec.health_service)
        except Exception as exc:  # noqa: BLE001 - reported as unhealthy
            problems.append(f"{name} ({target}): {exc}")
            continue
        if not ok:
            problems.append(f"{name} ({target}): not SERVING")
    for service in public_services():
        try:
            if not _serving(mesh.envoy_address, service):
                problems.append(f"{service} through Envoy: not SERVING")
        except grpc.RpcError as exc:
            problems.append(f"{service} through Envoy: {exc.code().name}")  # type: ignore[attr-defined]
    return problems


def _serving(target: str, service: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return reply.status == health_pb2.HealthCheckResponse.SERVING


# -- a whole run --------------------------------------------------------------------------------

ROUND = 125
"""Cases drawn per RPC at a time: the next round is drawn while one is sent."""


CHANNEL_OPTIONS = [("grpc.max_send_message_length", 16 << 20)]


async def fuzz(
    target: str,
    tenants: FuzzTenants,
    *,
    per_rpc: int,
    concurrency: int = 16,
    seed: int = 0,
    methods: Sequence[descriptor.MethodDescriptor] = (),
    seconds: float | None = None,
    progress: Callable[[str], None] = logger.info,
) -> FuzzRun:
    """Sends `per_rpc` cases of every public RPC (or of `methods`) to `target`, the RPCs'
    cases shuffled together, and undoes what they created; with `seconds`, starts no
    round of cases after that much time spent sending. The run's `tally` says what
    happened."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as blocking:
            run = FuzzRun(channel, blocking, tenants)
            await _fuzz(
                run,
                per_rpc=per_rpc,
                concurrency=concurrency,
                seed=seed,
                methods=methods or public_methods(),
                seconds=seconds,
                progress=progress,
            )
            return run


async def _fuzz(
    run: FuzzRun,
    *,
    per_rpc: int,
    concurrency: int,
    seed: int,
    methods: Sequence[descriptor.MethodDescriptor],
    seconds: float | None,
    progress: Callable[[str], None],
) -> None:
    from switchboard.chat.v1 import chat_service_pb2_grpc
    from switchboard.execution.v1 import execution_service_pb2_grpc

    channel, tenants = run.channel, run.tenants
    me = tenants.as_tenant(tenants.tenant)
    session = await chat_service_pb2_grpc.ChatServiceStub(channel).CreateSession(
        chat_pb2.CreateSessionRequest(title="fuzz"), metadata=me, timeout=30
    )
    task = await execution_service_pb2_grpc.ExecutionServiceStub(channel).SubmitTask(
        execution_pb2.SubmitTaskRequest(
            steps=[
                execution_pb2.Step(
                    name="wait", code=execution_pb2.CodeStep(code="import time\ntime.sleep(30)")
                )
            ]
        ),
        metadata=me,
        timeout=30,
    )
    run.created_sessions.add(session.session.session_id)
    run.created_tasks.add(task.task.task_id)
    seeds = seed_requests(
        tenants.tenant, session_id=session.session.session_id, task_id=task.task.task_id
    )
    hints = (tenants.tenant, session.session.session_id, task.task.task_id)

    names = [m.full_name for m in methods]
    wire_seeds = {
        name: [r.SerializeToString() for r in requests] for name, requests in seeds.items()
    }
    pool = descriptor_pool.Default()
    loop = asyncio.get_running_loop()
    rounds = -(-per_rpc // ROUND)
    drawer = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def drawing(number: int) -> asyncio.Future[list[WireCase]]:
        count = min(ROUND, per_rpc - number * ROUND)
        job = functools.partial(
            draw_round,
            names,
            count,
            wire_seeds,
            seed=seed * 1_000_003 + number * 1009,
            hints=hints,
        )
        return loop.run_in_executor(drawer, job)

    try:
        next_round = drawing(0)
        for number in range(rounds):
            wire = await next_round
            if seconds is not None and run.tally.seconds >= seconds:
                progress(f"fuzz: {seconds:g} s spent sending, {rounds - number} rounds left out")
                break
            if number + 1 < rounds:
                next_round = drawing(number + 1)
            cases = [
                Case(pool.FindMethodByName(name), requests, operator, malformed)
                for name, requests, operator, malformed in wire
            ]
            await run.run(cases, concurrency=concurrency)
            progress(
                f"fuzz round {number + 1}/{rounds}: {run.tally.total} cases, "
                f"{len(run.tally.findings)} findings, {run.tally.seconds:.0f} s sending"
            )
    finally:
        drawer.shutdown(wait=False, cancel_futures=True)
        await run.clean_up()
