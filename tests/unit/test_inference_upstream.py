"""OpenAI-compatible upstreams without a network: `models.yaml` entries, the messages a
generation becomes, and which upstream failures another backend or tier may retry."""

from __future__ import annotations

import httpx2 as httpx
import openai
import pytest
import yaml

from services.inference.config import InferenceConfig
from services.inference.policy import ModelPolicy
from services.inference.triton import BackendFailure
from services.inference.upstream import Upstream, translate, upstream_messages
from services.runtime import DeadlineExceeded, Internal

REQUEST = httpx.Request("POST", "http://upstream/v1/chat/completions")


def status_error(status: int) -> openai.APIStatusError:
    return openai.APIStatusError(
        "refused", response=httpx.Response(status, request=REQUEST), body=None
    )


def test_an_upstream_entry_names_its_endpoint_and_model():
    upstream = Upstream.parse(
        {"base_url": "https://api.example.com/v1/", "model": "m-1", "api_key_env": "K"},
        generator="hosted",
    )
    assert (upstream.base_url, upstream.model, upstream.api_key_env) == (
        "https://api.example.com/v1",
        "m-1",
        "K",
    )
    assert Upstream.parse({"base_url": "http://h/v1"}, generator="g").model == "g"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"kind": "grpc", "base_url": "http://h/v1"}, "unknown upstream kind"),
        ({"model": "m"}, "http"),
        ({"base_url": "ftp://h/v1"}, "http"),
    ],
)
def test_a_bad_upstream_entry_is_refused(raw, problem):
    with pytest.raises(ValueError, match=problem):
        Upstream.parse(raw, generator="g")


def test_the_key_comes_from_the_environment_never_the_file(monkeypatch):
    upstream = Upstream(base_url="http://h/v1", model="m", api_key_env="UPSTREAM_KEY")
    monkeypatch.delenv("UPSTREAM_KEY", raising=False)
    with pytest.raises(ValueError, match="UPSTREAM_KEY"):
        upstream.api_key()
    monkeypatch.setenv("UPSTREAM_KEY", "sk-1")
    assert upstream.api_key() == "sk-1"
    assert Upstream(base_url="http://h/v1", model="m").api_key() == "-"


def test_passages_become_system_messages_before_the_prompt():
    assert upstream_messages("q?", ["a.", "b."]) == [
        {"role": "system", "content": "a."},
        {"role": "system", "content": "b."},
        {"role": "user", "content": "q?"},
    ]
    assert upstream_messages("q?", []) == [{"role": "user", "content": "q?"}]


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
def test_overload_and_server_failures_let_another_backend_try(status):
    assert isinstance(translate(status_error(status), "b"), BackendFailure)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_a_refused_request_is_not_retried_elsewhere(status):
    error = translate(status_error(status), "b")
    assert isinstance(error, Internal) and not isinstance(error, BackendFailure)
    assert error.metadata == {"backend": "b"}


def test_connection_failures_and_timeouts():
    assert isinstance(translate(openai.APIConnectionError(request=REQUEST), "b"), BackendFailure)
    assert isinstance(translate(openai.APITimeoutError(request=REQUEST), "b"), DeadlineExceeded)


def test_triton_serves_only_the_generators_without_an_upstream(tmp_path):
    policy = yaml.safe_load(InferenceConfig.model_policy.read_text())
    policy["generators"][1]["upstream"] = {"base_url": "http://h/v1"}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(policy))
    loaded = ModelPolicy.load(path)
    hosted = policy["generators"][1]["name"]
    assert hosted not in loaded.triton_models
    assert loaded.embedder.name in loaded.triton_models
    assert next(g for g in loaded.generators if g.name == hosted).upstream is not None
