"""What a chat answer shows (`make demo`, `switchboard chat`): a code step's passage
and the answer's sources."""

from __future__ import annotations

from google.protobuf import struct_pb2
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.common.v1 import common_pb2
from switchboard.rag.v1 import rag_pb2

from services.chat.commands import RUN_CODE
from services.chat.turns import tool_passage_text
from services.launcher.chat import render


def code_output(**fields: object) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.update(fields)
    return value


def test_a_final_print_adds_no_none_to_the_code_passage():
    # the sandbox reports repr() of the final expression, and print(...) is one
    output = code_output(stdout="on-call weeks: 13\n", result="None", exit_code=0)
    assert tool_passage_text(output, RUN_CODE) == "on-call weeks: 13"


def test_the_code_passage_keeps_a_final_value_and_says_when_there_is_nothing():
    assert tool_passage_text(code_output(stdout="a\n", result="42"), RUN_CODE) == "a\n42"
    assert tool_passage_text(code_output(result="'None'"), RUN_CODE) == "'None'"  # a string
    assert tool_passage_text(code_output(stdout="", result="None"), RUN_CODE) == "(no output)"
    assert tool_passage_text(code_output(stdout=""), RUN_CODE) == "(no output)"


def citations(documents: list[str], cited: list[int]) -> pb.ConverseResponse:
    frame = pb.ConverseResponse()
    frame.citations.passages.extend(
        rag_pb2.RetrievedChunk(chunk_id=f"{d}:{i}", document_id=d) for i, d in enumerate(documents)
    )
    frame.citations.citations.extend(common_pb2.Citation(passage_index=i) for i in cited)
    return frame


def test_a_document_with_several_retrieved_chunks_is_one_source():
    frame = citations(["tool:run_code", "hb-001", "hb-001", "hb-031"], cited=[0])
    assert render(frame) == (
        "\nsources:\n  [1] tool:run_code (cited)\n  [2] hb-001\n  [3] hb-031\n"
    )


def test_a_source_is_cited_when_any_of_its_chunks_is():
    frame = citations(["hb-012", "hb-012", "hb-023", "hb-012"], cited=[3, 2])
    assert render(frame) == "\nsources:\n  [1] hb-012 (cited)\n  [2] hb-023 (cited)\n"
