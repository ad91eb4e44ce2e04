"""Each engine kind's official image: pinned to the release kiban's environments install, and
naming the programs its launch command uses."""

from __future__ import annotations

import pytest

from kiban.config import EngineConfig
from kiban.engines import ENGINE_KINDS, llamacpp, lmdeploy, sglang, vllm
from kiban.engines.launch import ContainerTarget, LaunchUnsupported

LAUNCHED = ("vllm", "llamacpp", "lmdeploy", "sglang")


def _engine(kind: str, device: str) -> EngineConfig:
    launch = {"model": "/m", "device": device, "port": 8000}
    return EngineConfig(name="e", kind=kind, models=["m"], launch=launch)


@pytest.mark.parametrize("kind", LAUNCHED)
def test_gpu_image_runs_the_launch_command(kind):
    image = ENGINE_KINDS[kind].container_image("gpu")
    assert ":" in image.image and not image.image.endswith(":latest")
    target = ContainerTarget(env_root=None, host="0.0.0.0", port=8000, programs=image.programs)
    argv = ENGINE_KINDS[kind].launch().argv(_engine(kind, "gpu"), target)
    assert argv[0] in image.programs.values()  # no program of a local environment
    assert image.health_tool[0] == "curl"


def test_images_carry_the_versions_the_environments_install():
    versions = {
        "vllm": vllm.PINNED_VERSION,
        "lmdeploy": lmdeploy.PINNED_VERSION,
        "sglang": sglang.PINNED_VERSION,
    }
    for kind, version in versions.items():
        tag = ENGINE_KINDS[kind].container_image("gpu").image.split(":")[1]
        assert tag == f"v{version}" or tag.startswith(f"v{version}-"), (kind, tag)
    assert vllm.VLLM_CPU_VERSION == vllm.PINNED_VERSION
    assert ENGINE_KINDS["vllm"].container_image("cpu").image == (
        f"vllm/vllm-openai-cpu:v{vllm.PINNED_VERSION}"
    )
    # llama.cpp: the environments build commit LLAMA_CPP_COMMIT, released as b11312
    assert f"-DLLAMA_BUILD_COMMIT={llamacpp.LLAMA_CPP_COMMIT}" in llamacpp.LLAMACPP_CMAKE_FLAGS
    assert ENGINE_KINDS["llamacpp"].container_image("gpu").image.endswith(":server-cuda-b11312")
    assert ENGINE_KINDS["llamacpp"].container_image("cpu").image.endswith(":server-b11312")


@pytest.mark.parametrize("kind", ["lmdeploy", "sglang"])
def test_gpu_only_kinds_refuse_the_cpu(kind):
    with pytest.raises(LaunchUnsupported, match=r"launch\.device: gpu"):
        ENGINE_KINDS[kind].container_image("cpu")


def test_a_kind_without_an_image_says_what_to_give():
    with pytest.raises(LaunchUnsupported, match=r"launch\.image"):
        ENGINE_KINDS["openai"].container_image("cpu")
