"""Chat sessions: 1,000 bidirectional Converse streams held open at once against the mesh,
each talking every few seconds.

One client process (grpc.aio, CHANNELS channels to Envoy's public listener, so several
HTTP/2 connections spread over Envoy's worker threads) creates SESSIONS sessions, opens a
Converse stream on each (at most OPEN_CONCURRENCY opening at a time) and waits until every
stream has its SessionOpened. Then, for DURATION_S, every stream sends a user message at
jittered intervals of INTERVAL_S (the first at a random offset, so the load is spread) and
reads every frame of the turn to its TurnCompleted; a message is never sent while the
stream's previous turn is still running (a message due while its turn was still running
is sent when the turn ends, and counted as late: the load is closed-loop, so the messages
sent say what the mesh served, not what was offered). The streams are held open to the
end of the window, then every stream half-closes and must end with OK.

Errors are anything that is not a clean turn: an RPC error on a stream, an ErrorFrame, a
turn whose TurnCompleted is not COMPLETED, a stream ending early or a frame not arriving
within TIMEOUT_S. The first few of each kind are printed.

"Held open simultaneously" is checked on both sides while the load runs: the client's
count of streams that have their SessionOpened and have not ended, the chat process's own
`switchboard_rpc_in_flight` gauge for ChatService, and Envoy's active requests on the
`chat` cluster.

Memory: the chat service process's VmRSS (/proc) after a warm-up and before any stream
opens, once all streams are open and idle, and its peak during the load; per session =
(open - before) / sessions. Its open file descriptors are read the same way.

To say why when turns are slow or fail, the run also prints: CPU seconds per mesh
process (with its children) and of this client, how busy the whole machine was, how long
the chat's event-loop thread waited runnable for a CPU (schedstat), the admission
replicas' leases and queue depth every 5 s, the leases still held once every stream has
ended (a lease granted but never released keeps a slot of the tier's ceiling until it
expires), the mean server-side admission wait and Generate duration, and the warnings and
errors in the chat, inference and admission logs.

Sessions use RAG off and `generator_small` with max_tokens MAX_TOKENS (the model's answer
without context is 21 tokens): the benchmark is about holding streams, not about the
model. The tenant gets an admission policy above any rate it reaches, since the default
policy (10 requests/s) would refuse this load by design.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from switchboard.admission.v1 import admission_service_pb2_grpc
from switchboard.chat.v1 import chat_pb2, chat_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2

from bench._common import (
    api_key_metadata,
    cpu_seconds,
    give_tenant_room,
    machine_ticks,
    ms,
    operator_metadata,
    percentile,
    print_table,
    running_mesh,
    write_result,
)
from bench.chat_latency import BENCH_POLICY

NAME = "chat-sessions"
SESSIONS = 1000
CHANNELS = 8
OPEN_CONCURRENCY = 100
DURATION_S = 75.0
INTERVAL_S = (3.0, 5.0)
MAX_TOKENS = 32
MODEL = "generator_small"
TIMEOUT_S = 60.0
WARMUP_SESSIONS = 20
QUESTIONS = (
    "How long is an on-call shift and when does it hand over?",
    "Who approves expense reports?",
    "What is the on-call escalation?",
    "When are stipends paid?",
)
TENANT = BENCH_POLICY.tenant_id
CHAT_SERVICE = "switchboard.chat.v1.ChatService"
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Tally:
    """What the streams saw; shared by every session coroutine (one event loop)."""

    opened: int = 0
    open_now: int = 0
    min_open_during_load: int | None = None
    sent: int = 0
    frames: int = 0
    turns: int = 0
    late_sends: int = 0
    ttft: list[float] = field(default_factory=list)
    started_s: list[float] = field(default_factory=list)
    """From writing the message to TurnStarted (the chat's PostgreSQL work)."""
    streaming_s: list[float] = field(default_factory=list)
    """From the first token frame to the last."""
    finishing_s: list[float] = field(default_factory=list)
    """From the last token frame to TurnCompleted (the answer stored in PostgreSQL)."""
    turn_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    loop_lag: list[float] = field(default_factory=list)
    closed_ok: int = 0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < 5:
            shown.append(detail)


class Failed(Exception):
    """The stream cannot go on; `kind` is how it is counted."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


# -- the chat process, seen from outside ---------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Where the chat process, the admission replicas and Envoy report on themselves."""

    pid: int
    metrics_url: str
    envoy_stats_url: str
    admission_urls: tuple[str, ...]
    inference_url: str

    def rss_kb(self) -> int:
        return _proc_field(self.pid, "VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_limit(self) -> str:
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
        return "?"

    def in_flight(self) -> float:
        text = _get(self.metrics_url)
        match = re.search(
            rf'^switchboard_rpc_in_flight\{{service="{re.escape(CHAT_SERVICE)}"\}} (\S+)$',
            text,
            re.MULTILINE,
        )
        return float(match.group(1)) if match else float("nan")

    def admission(self) -> tuple[int, int]:
        """(leases held, requests queued), summed over the admission replicas."""
        leases = queued = 0
        for url in self.admission_urls:
            text = _get(url)
            for line in text.splitlines():
                if line.startswith("switchboard_admission_leases "):
                    leases += int(float(line.split()[1]))
                elif line.startswith("switchboard_admission_queue_depth{"):
                    queued += int(float(line.split()[1]))
        return leases, queued

    def admission_refusals(self) -> dict[str, int]:
        """Refusals of the bench tenant by reason, summed over the replicas."""
        refused: Counter[str] = Counter()
        pattern = re.compile(
            r'^switchboard_admission_refused_total\{[^}]*tenant="'
            + re.escape(TENANT)
            + r'"[^}]*reason="([A-Z_]+)"[^}]*\} (\S+)$'
        )
        for url in self.admission_urls:
            for line in _get(url).splitlines():
                if match := pattern.match(line):
                    refused[match.group(1)] += int(float(match.group(2)))
        return dict(refused)

    def histogram_means(self) -> dict[str, float]:
        """Mean seconds of the server-side histograms that explain a turn's time."""
        wanted = {
            "admission wait (admission)": (
                self.admission_urls,
                "switchboard_admission_wait_seconds",
                "",
            ),
            "Generate (inference, server side)": (
                (self.inference_url,),
                "switchboard_rpc_duration_seconds",
                'method="Generate"',
            ),
            "AdmitStream (admission, server side)": (
                self.admission_urls,
                "switchboard_rpc_duration_seconds",
                'method="AdmitStream"',
            ),
            "Release (admission, server side)": (
                self.admission_urls,
                "switchboard_rpc_duration_seconds",
                'method="Release"',
            ),
        }
        means = {}
        for label, (urls, name, match) in wanted.items():
            total = count = 0.0
            for url in urls:
                for line in _get(url).splitlines():
                    if match not in line:
                        continue
                    if line.startswith(f"{name}_sum"):
                        total += float(line.split()[-1])
                    elif line.startswith(f"{name}_count"):
                        count += float(line.split()[-1])
            if count:
                means[label] = total / count
        return means

    def envoy_resets(self) -> dict[str, int]:
        """Envoy's non-zero counters about reset streams and closed connections."""
        stats = json.loads(_get(self.envoy_stats_url.partition("&filter=")[0]))
        pattern = re.compile(
            r"premature|flood|rx_reset|tx_reset|cx_destroy_(local|remote)_with_active_rq"
            r"|cx_protocol_error|goaway|stream_idle_timeout|rq_reset_after_downstream"
        )
        return {
            stat["name"]: int(stat["value"])
            for stat in stats.get("stats", [])
            if "value" in stat and pattern.search(stat["name"]) and stat["value"]
        }

    def envoy_active(self) -> int:
        stats = json.loads(_get(self.envoy_stats_url))
        for stat in stats.get("stats", []):
            if stat.get("name") == "cluster.chat.upstream_rq_active":
                return int(stat["value"])
        return -1


def sched_ns(pid: int) -> tuple[int, int]:
    """(ran, waited for a CPU) nanoseconds of a process's main thread (schedstat)."""
    ran, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(ran), int(waited)


def _proc_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {name} in /proc/{pid}/status")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback
        return reply.read().decode()


def _metrics_url(mesh: Any, pid: int, service: str) -> str:
    """A service process's /metrics, from the port the launcher gave it."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(e.decode().partition("=")[::2] for e in environ if b"=" in e)
    port = env[f"SWITCHBOARD_{service.upper()}_METRICS_PORT"]
    return f"http://{mesh.config.host}:{port}/metrics"


def probe_of(mesh: Any) -> Probe:
    records = [r for r, alive in mesh.status() if alive]
    (chat,) = [r for r in records if r.name == "chat"]
    admission = [r for r in records if r.name.startswith("admission")]
    (inference,) = [r for r in records if r.name == "inference"]
    return Probe(
        pid=chat.pid,
        metrics_url=_metrics_url(mesh, chat.pid, "chat"),
        admission_urls=tuple(_metrics_url(mesh, r.pid, "admission") for r in admission),
        inference_url=_metrics_url(mesh, inference.pid, "inference"),
        envoy_stats_url=(
            f"http://127.0.0.1:{mesh.config.envoy_admin_port}/stats?format=json"
            "&filter=cluster.chat.upstream_rq_active"
        ),
    )


# -- one session --------------------------------------------------------------------------


async def _read(call: Any) -> chat_pb2.ConverseResponse:
    try:
        frame = await asyncio.wait_for(call.read(), TIMEOUT_S)
    except TimeoutError:
        raise Failed("frame_timeout", f"no frame within {TIMEOUT_S:.0f}s") from None
    if frame is grpc.aio.EOF:
        raise Failed("stream_ended", f"the stream ended early: {await call.code()}")
    return frame


async def _turn(call: Any, text: str, tally: Tally) -> None:
    """One user message, read to its TurnCompleted."""
    client_id = uuid.uuid4().hex
    started = time.perf_counter()
    tally.sent += 1
    await call.write(
        chat_pb2.ConverseRequest(
            message=chat_pb2.UserMessage(client_message_id=client_id, text=text)
        )
    )
    first = last = None
    failed = False
    while True:
        frame = await _read(call)
        tally.frames += 1
        kind = frame.WhichOneof("frame")
        if kind == "turn_started":
            tally.started_s.append(time.perf_counter() - started)
        elif kind == "token":
            last = time.perf_counter() - started
            if first is None:
                first = last
        elif kind == "error":
            failed = True
            status = frame.error.status
            reason = _reason(status)
            tally.error(f"error_frame:{reason}", f"{status.code} {reason}: {status.message}")
        elif kind == "turn_completed":
            status = frame.turn_completed.status
            if status != chat_pb2.MESSAGE_STATUS_COMPLETED:
                if not failed:  # an ErrorFrame already counted this turn
                    tally.error(
                        "turn_not_completed", chat_pb2.MessageStatus.Name(status) + f" {client_id}"
                    )
                return
            if failed:
                return
            tally.turns += 1
            done = time.perf_counter() - started
            tally.turn_s.append(done)
            if first is not None and last is not None:
                tally.ttft.append(first)
                tally.streaming_s.append(last - first)
                tally.finishing_s.append(done - last)
            return


def _reason(status: Any) -> str:
    from google.rpc import error_details_pb2

    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return f"code{status.code}"


async def _session(
    stub: chat_service_pb2_grpc.ChatServiceStub,
    metadata: Metadata,
    session_id: str,
    *,
    opening: asyncio.Semaphore,
    go: asyncio.Event,
    window: list[float],
    tally: Tally,
    rng: random.Random,
) -> None:
    call = stub.Converse(metadata=metadata)
    is_open = False
    try:
        async with opening:
            await call.write(
                chat_pb2.ConverseRequest(open=chat_pb2.OpenSession(session_id=session_id))
            )
            frame = await _read(call)
            if frame.WhichOneof("frame") != "opened":
                raise Failed("not_opened", f"first frame {frame.WhichOneof('frame')}")
        is_open = True
        tally.opened += 1
        tally.open_now += 1
        await go.wait()
        start, end = window
        next_send = start + rng.uniform(0, INTERVAL_S[1])
        while next_send < end:
            if (delay := next_send - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            await _turn(call, rng.choice(QUESTIONS), tally)
            next_send += rng.uniform(*INTERVAL_S)
            if next_send < time.perf_counter():  # the turn outlasted the interval
                tally.late_sends += 1
                next_send = time.perf_counter()
        if (rest := end - time.perf_counter()) > 0:  # held open to the end of the window
            await asyncio.sleep(rest)
        await call.done_writing()
        while (frame := await asyncio.wait_for(call.read(), TIMEOUT_S)) is not grpc.aio.EOF:
            if frame.WhichOneof("frame") == "error":
                tally.error("error_frame_at_close", frame.error.status.message)
        code = await call.code()
        if code == grpc.StatusCode.OK:
            tally.closed_ok += 1
        else:
            tally.error(f"close:{code.name}", await call.details() or "")
    except Failed as failure:
        tally.error(failure.kind, f"{session_id}: {failure}")
        call.cancel()
    except grpc.aio.AioRpcError as error:
        tally.error(f"rpc:{error.code().name}", f"{session_id}: {error.details()}")
    except TimeoutError:
        tally.error("close_timeout", f"{session_id}: no end of stream after half-close")
        call.cancel()
    finally:
        if is_open:
            tally.open_now -= 1
            if go.is_set() and time.perf_counter() < window[1]:
                tally.min_open_during_load = min(
                    tally.min_open_during_load or SESSIONS, tally.open_now
                )


async def _watch_loop(tally: Tally, stop: asyncio.Event) -> None:
    """The client's own event-loop lag: how late a 50 ms sleep wakes up."""
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(0.05)
        tally.loop_lag.append(time.perf_counter() - began - 0.05)


# -- the run ------------------------------------------------------------------------------


async def _create(
    stub: chat_service_pb2_grpc.ChatServiceStub, metadata: Metadata, count: int
) -> list[str]:
    settings = chat_pb2.SessionSettings(
        model=MODEL, parameters=inference_pb2.GenerationParameters(max_tokens=MAX_TOKENS)
    )
    limit = asyncio.Semaphore(32)

    async def one(i: int) -> str:
        async with limit:
            reply = await stub.CreateSession(
                chat_pb2.CreateSessionRequest(title=f"bench {i}", settings=settings),
                metadata=metadata,
                timeout=30,
            )
            return reply.session.session_id

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _warm_up(
    stub: chat_service_pb2_grpc.ChatServiceStub, metadata: Metadata, session_ids: list[str]
) -> None:
    """A few short conversations, so the chat process has loaded and compiled what a turn
    needs before its memory is read."""

    async def one(session_id: str) -> None:
        call = stub.Converse(metadata=metadata)
        await call.write(chat_pb2.ConverseRequest(open=chat_pb2.OpenSession(session_id=session_id)))
        await _read(call)
        tally = Tally()
        await _turn(call, QUESTIONS[0], tally)
        if tally.errors:
            raise RuntimeError(f"warm-up turn failed: {dict(tally.examples)}")
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    await asyncio.gather(*(one(s) for s in session_ids))


@dataclass
class Outcome:
    tally: Tally
    rss_before_kb: int
    rss_open_kb: int
    rss_peak_kb: int
    fds_before: int
    fds_open: int
    fd_limit: str
    server_open: list[tuple[float, int]]
    """(chat's in-flight gauge, Envoy's active chat requests), sampled during the load."""
    open_s: float
    load_s: float
    leases_after: int = 0
    """Admission leases still held once every stream has ended (should be 0)."""
    refusals: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process kind during the load (window and drain)."""
    machine_busy_cores: float = 0.0
    """Cores the whole machine was busy during the load (every process, ours or not)."""
    chat_loop: tuple[float, float] = (0.0, 0.0)
    """Seconds the chat's event-loop thread ran, and waited runnable for a CPU."""
    envoy_resets: dict[str, int] = field(default_factory=dict)


async def _measure(mesh: Any) -> Outcome:
    metadata = api_key_metadata(mesh, TENANT)
    probe = probe_of(mesh)
    rng = random.Random(7)
    channels = [
        grpc.aio.insecure_channel(
            mesh.envoy_address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(CHANNELS)
    ]
    try:
        stubs = [chat_service_pb2_grpc.ChatServiceStub(c) for c in channels]
        await give_tenant_room(
            admission_service_pb2_grpc.AdmissionServiceStub(channels[0]),
            operator_metadata(mesh),
            BENCH_POLICY,
        )
        session_ids = await _create(stubs[0], metadata, SESSIONS + WARMUP_SESSIONS)
        warm, session_ids = session_ids[:WARMUP_SESSIONS], session_ids[WARMUP_SESSIONS:]
        await _warm_up(stubs[0], metadata, warm)
        await asyncio.sleep(2)
        rss_before, fds_before = probe.rss_kb(), probe.fds()
        print(f"  chat pid {probe.pid}: VmRSS {rss_before / 1024:.1f} MiB, {fds_before} fds")

        tally = Tally()
        go = asyncio.Event()
        stop = asyncio.Event()
        window = [0.0, 0.0]
        opening = asyncio.Semaphore(OPEN_CONCURRENCY)
        lag = asyncio.create_task(_watch_loop(tally, stop))
        began = time.perf_counter()
        tasks = [
            asyncio.create_task(
                _session(
                    stubs[i % CHANNELS],
                    metadata,
                    sid,
                    opening=opening,
                    go=go,
                    window=window,
                    tally=tally,
                    rng=random.Random(rng.random()),
                )
            )
            for i, sid in enumerate(session_ids)
        ]
        while tally.opened + sum(tally.errors.values()) < SESSIONS:
            await asyncio.sleep(0.1)
            if time.perf_counter() - began > 120:
                break
        open_s = time.perf_counter() - began
        await asyncio.sleep(2)
        rss_open, fds_open = probe.rss_kb(), probe.fds()
        server_open = [(probe.in_flight(), probe.envoy_active())]
        print(
            f"  {tally.opened} streams open in {open_s:.1f}s (client); chat in-flight "
            f"{server_open[0][0]:g}, Envoy active {server_open[0][1]}; VmRSS "
            f"{rss_open / 1024:.1f} MiB, {fds_open} fds"
        )
        if tally.opened < SESSIONS:
            print(f"  only {tally.opened} of {SESSIONS} opened: {dict(tally.examples)}")

        tally.loop_lag.clear()
        cpu_before = cpu_seconds(mesh)
        ticks_before, sched_before = machine_ticks(), sched_ns(probe.pid)
        window[:] = [time.perf_counter(), time.perf_counter() + DURATION_S]
        go.set()
        rss_peak = rss_open
        while time.perf_counter() < window[1] - 1:
            await asyncio.sleep(min(5, window[1] - 1 - time.perf_counter()))
            rss_peak = max(rss_peak, probe.rss_kb())
            server_open.append((probe.in_flight(), probe.envoy_active()))
            if time.perf_counter() < window[1]:
                tally.min_open_during_load = min(
                    tally.min_open_during_load or SESSIONS, tally.open_now
                )
            leases, queued = probe.admission()
            print(
                f"  t+{time.perf_counter() - window[0]:3.0f}s: {tally.open_now} open, "
                f"{tally.sent} sent, {tally.turns} turns, {sum(tally.errors.values())} errors; "
                f"chat in-flight {server_open[-1][0]:g}, Envoy active {server_open[-1][1]}, "
                f"admission leases {leases} queued {queued}, chat VmRSS "
                f"{probe.rss_kb() / 1024:.1f} MiB",
                flush=True,
            )
        await asyncio.gather(*tasks)
        load_s = time.perf_counter() - window[0]
        cpu_after = cpu_seconds(mesh)
        ticks_after, sched_after = machine_ticks(), sched_ns(probe.pid)
        all_ticks = ticks_after[0] - ticks_before[0]
        busy = (1 - (ticks_after[1] - ticks_before[1]) / all_ticks) * (os.cpu_count() or 1)
        ran, waited = (sched_after[i] - sched_before[i] for i in (0, 1))
        cpu = {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after}
        stop.set()
        await lag
        await asyncio.sleep(3)  # releases run in the background
        leases_after, _ = probe.admission()
        refusals = probe.admission_refusals()
        for label, mean in probe.histogram_means().items():
            print(f"  mean {label}: {ms(mean):.1f} ms")
        print(f"  all streams ended; admission leases still held: {leases_after}")
        resets = probe.envoy_resets()
        print_table(
            "Envoy: resets and closed connections", ("counter", "value"), list(resets.items())
        )
        return Outcome(
            tally,
            rss_before,
            rss_open,
            rss_peak,
            fds_before,
            fds_open,
            probe.fd_limit(),
            server_open,
            open_s,
            load_s,
            leases_after,
            refusals,
            cpu,
            busy,
            (ran / 1e9, waited / 1e9),
            resets,
        )
    finally:
        for c in channels:
            await c.close()


EXCEPTIONS: dict[str, str] = {}


def _log_problems(mesh: Any) -> dict[str, Counter[str]]:
    """Warnings and errors in the chat, inference and admission logs, by message (the
    first traceback of each message is kept in EXCEPTIONS)."""
    found: dict[str, Counter[str]] = {}
    for path in sorted((mesh.config.run_dir / "logs").glob("*.log")):
        if not path.stem.startswith(("chat", "inference", "admission")):
            continue
        seen: Counter[str] = Counter()
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line:
                    seen["Traceback"] += 1
                continue
            if isinstance(entry, dict) and entry.get("level") in ("warning", "error"):
                message = f"{entry['level']}: {str(entry.get('msg')).splitlines()[0][:300]}"
                seen[message] += 1
                if "exc" in entry:
                    EXCEPTIONS.setdefault(message, str(entry["exc"]))
        if seen:
            found[path.stem] = seen
    return found


def run() -> dict:
    with running_mesh(triton_replicas=1) as mesh:
        out = asyncio.run(_measure(mesh))
        log_problems = _log_problems(mesh)

    t = out.tally
    errors = sum(t.errors.values())
    held = min(t.opened, t.min_open_during_load if t.min_open_during_load is not None else 0)
    server_min = min(int(v) for v, _ in out.server_open)
    envoy_min = min(a for _, a in out.server_open)
    per_session_kb = (out.rss_open_kb - out.rss_before_kb) / max(t.opened, 1)
    print_table(
        f"CPU during the load ({out.load_s:.0f}s, {os.cpu_count()} cores)",
        ("process", "cpu s", "cores"),
        [
            (name, f"{used:.1f}", f"{used / out.load_s:.2f}")
            for name, used in sorted(out.cpu.items(), key=lambda kv: -kv[1])
        ]
        + [("total", f"{sum(out.cpu.values()):.1f}", f"{sum(out.cpu.values()) / out.load_s:.2f}")],
    )
    ran, waited = out.chat_loop
    print(
        f"  whole machine busy: {out.machine_busy_cores:.2f} of {os.cpu_count()} cores; chat's "
        f"event-loop thread ran {ran:.1f}s and waited for a CPU {waited:.1f}s of {out.load_s:.0f}s"
    )
    rows = [
        (kind, n, " | ".join(t.examples.get(kind, [])[:2])[:150]) for kind, n in t.errors.items()
    ]
    if rows:
        print_table("errors", ("kind", "count", "examples"), rows)
    for log, seen in log_problems.items():
        print(f"  logs/{log}.log:")
        for message, count in seen.most_common(6):
            print(f"    {count:6d} x {message}")
            if message in EXCEPTIONS:
                print("           " + EXCEPTIONS[message][-1500:].replace("\n", "\n           "))
    metrics = {
        "sessions": held,
        "errors": errors,
        "mem_per_session_kb": per_session_kb,
        "turn_started_p50_ms": ms(percentile(t.started_s, 50)) if t.started_s else float("nan"),
        "ttft_p50_ms": ms(percentile(t.ttft, 50)) if t.ttft else float("nan"),
        "ttft_p99_ms": ms(percentile(t.ttft, 99)) if t.ttft else float("nan"),
        "streaming_p50_ms": ms(percentile(t.streaming_s, 50)) if t.ttft else float("nan"),
        "finishing_p50_ms": ms(percentile(t.finishing_s, 50)) if t.ttft else float("nan"),
        "turn_p50_ms": ms(percentile(t.turn_s, 50)) if t.turn_s else float("nan"),
        "turn_p99_ms": ms(percentile(t.turn_s, 99)) if t.turn_s else float("nan"),
        "messages_sent": t.sent,
        "turns_completed": t.turns,
        "turns_per_s": t.turns / out.load_s,
        "late_sends": t.late_sends,
        "server_in_flight_min": server_min,
        "envoy_active_min": envoy_min,
        "closed_ok": t.closed_ok,
        "chat_rss_before_mb": out.rss_before_kb / 1024,
        "chat_rss_open_mb": out.rss_open_kb / 1024,
        "chat_rss_peak_mb": out.rss_peak_kb / 1024,
        "frames_received": t.frames,
        "chat_fds_open": out.fds_open,
        "client_loop_lag_p99_ms": ms(percentile(t.loop_lag, 99)) if t.loop_lag else 0.0,
        "machine_busy_cores": out.machine_busy_cores,
        "chat_loop_cpu_wait_share": waited / out.load_s,
        "admission_leases_after": out.leases_after,
    }
    if out.refusals:
        print(f"  admission refusals of {TENANT!r}: {out.refusals}")
    notes = (
        f"{SESSIONS} Converse streams through Envoy from one grpc.aio client process over "
        f"{CHANNELS} channels, opened in {out.open_s:.1f}s, then for {DURATION_S:.0f}s each "
        f"sent a message every {INTERVAL_S[0]:g}-{INTERVAL_S[1]:g}s (uniform jitter, random "
        f"first offset) and read every frame to TurnCompleted; then half-closed (OK: "
        f"{t.closed_ok}). RAG off, {MODEL}, max_tokens {MAX_TOKENS}; one CPU Triton replica; "
        "client and mesh share the machine. sessions = streams open at once the whole load "
        "window (client count; chat's rpc_in_flight gauge and Envoy's cluster.chat."
        "upstream_rq_active sampled every 5s agree, see *_min). errors = RPC errors, "
        "ErrorFrames, turns not COMPLETED, frames later than "
        f"{TIMEOUT_S:.0f}s. mem_per_session_kb = chat VmRSS growth from before opening "
        f"(after {WARMUP_SESSIONS} warm-up conversations) to all open and idle, / streams; "
        f"chat fds {out.fds_before} -> {out.fds_open} (limit {out.fd_limit}): streams are "
        "multiplexed on Envoy's few upstream HTTP/2 connections. TTFT from writing the "
        "message to the first token frame, as the client saw it (its own loop lag p99 "
        "given); turn_started / streaming / finishing split a turn at TurnStarted, the "
        "first and the last token; late_sends = messages due while their stream's turn was "
        "still running (closed loop: messages_sent is what was served, not offered). "
        "machine_busy_cores = the whole machine, every process; chat_loop_cpu_wait_share = "
        "time the chat's event-loop thread waited runnable for a CPU / load time. Envoy: "
        "downstream max_concurrent_streams 4096 per connection, upstream "
        "1024 per connection, circuit breakers 10,000, stream_idle_timeout 300s. Tenant "
        f"{TENANT!r} given an admission policy above this load (default: 10 requests/s); "
        "the small tier's ceiling still applies (Triton's 16 streams per backend split over "
        "the 2 admission replicas: 8 generations in flight on the replica the tenant hashes "
        f"to). Admission leases still held once every stream had ended: {out.leases_after}"
        + (f"; errors by kind: {dict(t.errors)}" if t.errors else "")
        + (
            f"; Envoy closed {protocol_errors} connection(s) on protocol errors (see "
            f"the printed counters: {out.envoy_resets})"
            if (
                protocol_errors := out.envoy_resets.get(
                    "http.internal.downstream_cx_protocol_error"
                )
            )
            else ""
        )
    )
    targets = {"errors": "<= 0", "sessions": ">= 1000"}
    return write_result(NAME, metrics, targets, notes)
