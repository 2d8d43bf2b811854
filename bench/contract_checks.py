"""What the runtime's contract checks cost a call: the caller's principal against the
RPC's `authority`, then the request's `buf.validate` rules with protovalidate.

In process, no network: for a few typical requests, the time of the checks a server
makes before its handler runs, next to the time to parse the same request from the wire
(which every call pays anyway), measured side by side in one run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from switchboard.admission.v1 import admission_pb2 as adm
from switchboard.chat.v1 import chat_pb2 as chat
from switchboard.common.v1 import common_pb2
from switchboard.execution.v1 import execution_pb2 as exe
from switchboard.inference.v1 import inference_pb2 as inf

from bench._common import percentile, print_table, write_result
from services.runtime import Principal, method_contract, public_services

ROUNDS = 2_000
WARMUP = 200


def _requests() -> dict[str, tuple[str, Any]]:
    passage = "Triton batches concurrent requests dynamically. " * 8
    return {
        "Generate (5 passages)": (
            "/switchboard.inference.v1.InferenceService/Generate",
            inf.GenerateRequest(
                prompt="How does Triton batch requests?",
                context=[inf.Passage(source_id=f"doc-{i}#0", text=passage) for i in range(5)],
                parameters=inf.GenerationParameters(max_tokens=256, temperature=0.2),
                session_id="9f1c2e0a-7b2d-4c3e-8f00-000000000001",
                priority=common_pb2.PRIORITY_INTERACTIVE,
            ),
        ),
        "SubmitTask (3 steps)": (
            "/switchboard.execution.v1.ExecutionService/SubmitTask",
            exe.SubmitTaskRequest(
                idempotency_key="job-42",
                labels={"team": "core"},
                steps=[
                    exe.Step(name="models", tool=exe.ToolStep(tool="list_models")),
                    exe.Step(
                        name="count",
                        depends_on=["models"],
                        code=exe.CodeStep(code="len(inputs['m'])", inputs={"m": "{{x}}"}),
                    ),
                    exe.Step(
                        name="answer",
                        depends_on=["count"],
                        generate=exe.GenerateStep(prompt="There are {{steps.count.output}}."),
                    ),
                ],
            ),
        ),
        "AdmitStream": (
            "/switchboard.admission.v1.AdmissionService/AdmitStream",
            adm.AdmitStreamRequest(
                request=adm.AdmitRequest(
                    context=common_pb2.RequestContext(request_id="r-1", user_id="u-1"),
                    tier=common_pb2.MODEL_TIER_SMALL,
                    estimated_prompt_tokens=300,
                    max_completion_tokens=256,
                )
            ),
        ),
        "CreateSession": (
            "/switchboard.chat.v1.ChatService/CreateSession",
            chat.CreateSessionRequest(
                title="support",
                settings=chat.SessionSettings(system_prompt="Be brief.", collection="handbook"),
            ),
        ),
    }


def _timed(action: Callable[[], Any]) -> list[float]:
    for _ in range(WARMUP):
        action()
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def run() -> dict:
    public_services()
    rows, metrics = [], {}
    for label, (path, request) in _requests().items():
        contract = method_contract(path)
        assert contract is not None, path
        wire = request.SerializeToString()
        parse = type(request).FromString
        # side by side, interleaved in blocks, so drift hits both alike
        checks, parsing = [], []
        for _ in range(5):
            checks += _timed(lambda c=contract, r=request: c.admit(Principal.TENANT, r))
            parsing += _timed(lambda p=parse, w=wire: p(w))
        p50, p99 = percentile(checks, 50), percentile(checks, 99)
        parse_p50 = percentile(parsing, 50)
        key = label.split(" ")[0].lower()
        metrics[f"{key}_checks_p50_us"] = p50
        metrics[f"{key}_checks_p99_us"] = p99
        metrics[f"{key}_parse_p50_us"] = parse_p50
        rows.append((label, len(wire), f"{p50:.1f}", f"{p99:.1f}", f"{parse_p50:.1f}"))
    print_table(
        "contract checks per call (µs)",
        ("request", "bytes", "checks p50", "checks p99", "parse p50"),
        rows,
    )
    return write_result(
        "contract-checks",
        metrics,
        {"generate_checks_p50_us": "<= 100", "submittask_checks_p50_us": "<= 200"},
        f"in process, {5 * ROUNDS:,} rounds per request, checks (authority + protovalidate "
        "2.1 rules) next to parsing the same request from its wire bytes",
    )


if __name__ == "__main__":
    run()
