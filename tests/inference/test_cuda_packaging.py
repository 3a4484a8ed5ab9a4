"""The CUDA execution provider can load wherever there is a GPU: every shared library it needs
is installed with the project, the NVIDIA driver (libcuda, the host's) aside. Checked on the
CPU: a GPU host was not needed to find that libcurand was missing, and the worker ran on the CPU
without a word beyond one warning."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import onnxruntime as ort
import pytest

from inference.runtime import choose_providers, load_cuda_libraries

DRIVER = {"libcuda.so.1"}  # installed with the NVIDIA driver on the host, never by pip


def _nvidia_lib_dirs() -> list[str]:
    """The lib/ folders of the nvidia-* wheels, where `preload_dlls` looks."""
    import nvidia  # namespace package of the nvidia-* wheels

    return sorted(str(d) for root in nvidia.__path__ for d in Path(root).glob("**/lib") if d.is_dir())


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_the_cuda_provider_finds_every_library_but_the_driver() -> None:
    lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    assert lib.exists(), "onnxruntime-gpu has no CUDA execution provider"
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([str(lib.parent), *_nvidia_lib_dirs()])}
    out = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, env=env, check=True).stdout
    missing = {line.split()[0] for line in out.splitlines() if "not found" in line}
    assert missing <= DRIVER, f"missing: {sorted(missing - DRIVER)}"


def test_the_cuda_libraries_load_only_where_a_driver_is() -> None:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        has_driver = True
    except OSError:
        has_driver = False
    assert load_cuda_libraries() is has_driver
    assert choose_providers("cpu") == ["CPUExecutionProvider"]


def test_provider_cuda_without_a_gpu_fails_instead_of_running_on_the_cpu(small_model_dir: Path) -> None:
    import ctypes

    from inference.runtime import ModelRuntime

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has an NVIDIA driver")
    except OSError:
        pass
    with pytest.raises(RuntimeError, match="provider=cuda"):
        ModelRuntime.load(small_model_dir, provider="cuda")
    assert ModelRuntime.load(small_model_dir, provider="auto").session.get_providers()[0] == "CPUExecutionProvider"
