"""The contract read from the descriptors: who may call each RPC, and the request rules
the runtime checks before a handler runs."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool
from switchboard.admission.v1 import admission_pb2
from switchboard.common.v1 import common_pb2

from services.runtime import (
    InvalidArgument,
    PermissionDenied,
    Principal,
    _context,
    method_contract,
    public_services,
    request_violations,
    validate_request,
)
from services.runtime._interceptors import _Method

OPERATOR_ONLY = {
    "switchboard.admission.v1.AdmissionService.UpdatePolicy",
    "switchboard.admission.v1.AdmissionService.ListPolicies",
    "switchboard.admission.v1.AdmissionService.DeletePolicy",
    "switchboard.auth.v1.KeyService.CreateKey",
    "switchboard.auth.v1.KeyService.ListKeys",
    "switchboard.auth.v1.KeyService.RevokeKey",
    "switchboard.auth.v1.KeyService.ListTenants",
}
TENANT_AND_OPERATOR = {
    "switchboard.admission.v1.AdmissionService.GetQuota",
    "switchboard.admission.v1.AdmissionService.GetPolicy",
}


def every_method() -> list[str]:
    pool = descriptor_pool.Default()
    return [
        m.full_name
        for service in public_services()
        for m in pool.FindServiceByName(service).methods
    ]


def test_every_public_rpc_names_who_may_call_it():
    methods = every_method()
    assert len(methods) >= 30
    for name in methods:
        contract = method_contract(name)
        assert contract is not None and contract.principals, name
        if name in OPERATOR_ONLY:
            assert contract.principals == {Principal.OPERATOR}, name
        elif name in TENANT_AND_OPERATOR:
            assert contract.principals == {Principal.TENANT, Principal.OPERATOR}, name
        else:
            assert contract.principals == {Principal.TENANT}, name
    assert OPERATOR_ONLY | TENANT_AND_OPERATOR <= set(methods)


def test_a_path_and_a_full_name_find_the_same_contract():
    by_path = method_contract("/switchboard.admission.v1.AdmissionService/UpdatePolicy")
    assert by_path == method_contract("switchboard.admission.v1.AdmissionService.UpdatePolicy")
    assert method_contract("/switchboard.admission.v1.AdmissionService/NoSuchMethod") is None
    assert method_contract("/nothing") is None


def test_the_principal_header_grants_operator_only_when_it_says_so():
    assert Principal.from_header("operator") is Principal.OPERATOR
    for value in (None, "", "tenant", "OPERATOR", "operator ", "admin"):
        assert Principal.from_header(value) is Principal.TENANT


def test_a_caller_outside_the_contract_is_refused_before_the_request_is_read():
    update = _Method("/switchboard.admission.v1.AdmissionService/UpdatePolicy")
    bad_request = admission_pb2.UpdatePolicyRequest()  # breaks `policy` required, too
    token = _context.principal.set(Principal.TENANT)
    try:
        with pytest.raises(PermissionDenied) as refused:
            update.admit(bad_request)
        assert refused.value.reason == "PRINCIPAL_NOT_ALLOWED"
        assert refused.value.metadata["principal"] == "tenant"
    finally:
        _context.principal.reset(token)
    token = _context.principal.set(Principal.OPERATOR)
    try:
        with pytest.raises(InvalidArgument) as invalid:
            update.admit(bad_request)
        assert [v.field for v in invalid.value.field_violations] == ["policy"]
        update.admit(admission_pb2.UpdatePolicyRequest(policy=admission_pb2.Policy(weight=2)))
    finally:
        _context.principal.reset(token)


def test_request_rules_name_each_field_by_its_path():
    request = admission_pb2.AdmitRequest(
        context=common_pb2.RequestContext(tenant_id="-bad", priority=42, user_id="u" * 129),
        tier=99,
        estimated_prompt_tokens=-1,
        max_completion_tokens=10_000_001,
    )
    request.max_wait.FromSeconds(3601)
    fields = sorted(v.field for v in request_violations(request))
    assert fields == [
        "context.priority",
        "context.tenant_id",
        "context.user_id",
        "estimated_prompt_tokens",
        "max_completion_tokens",
        "max_wait",
        "tier",
    ]
    with pytest.raises(InvalidArgument) as invalid:
        validate_request(admission_pb2.AdmitRequest(tier=7), prefix="request.")
    assert [v.field for v in invalid.value.field_violations] == ["request.tier"]
    assert request_violations(admission_pb2.AdmitRequest(estimated_prompt_tokens=5)) == []


def test_policy_values_are_bounded_and_zero_means_left_out():
    policy = admission_pb2.Policy(weight=1001, requests_per_second=float("nan"), max_queued=-1)
    fields = sorted(v.field for v in request_violations(policy))
    assert fields == ["max_queued", "requests_per_second", "weight"]
    assert request_violations(admission_pb2.Policy(tenant_id="acme", weight=5)) == []
