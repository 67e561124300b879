"""Optional peer runtimes for `dfplan bench e2e`: where llama.cpp lives and how it is built.

llama.cpp comes from the llama-cpp-python sdist, which vendors a llama.cpp with Mamba-2
support, its `convert_hf_to_gguf.py` and `llama-quantize`. `make peers` (this module's
`build`) builds it ONCE, niced, into a cache outside the repository (default
~/.cache/dfplan/peers, or $DFPLAN_PEERS_DIR): one CMake build gives the shared libraries the
Python bindings load (via LLAMA_CPP_LIB_PATH) and the llama-quantize tool; the bindings are then
installed without compiling anything a second time. Never part of `make test` or CI.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python"


def peers_dir() -> Path:
    return Path(os.environ.get("DFPLAN_PEERS_DIR", "~/.cache/dfplan/peers")).expanduser()


@dataclass(frozen=True)
class LlamaCpp:
    src: Path          # vendored llama.cpp source (convert_hf_to_gguf.py, gguf-py, models/)
    lib_dir: Path      # libllama.so + libggml*.so
    quantize: Path     # llama-quantize


def find_llama_cpp() -> tuple[LlamaCpp | None, str | None]:
    """(paths, None) when the cached build is complete, else (None, why not)."""
    root = peers_dir()
    srcs = sorted(glob.glob(str(root / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    if not srcs:
        return None, f"no llama.cpp source under {root} (run `make peers`)"
    src = Path(srcs[-1])
    if not (src / "convert_hf_to_gguf.py").exists():
        return None, f"{src} has no convert_hf_to_gguf.py"
    bin_dir = root / "build" / "bin"
    quant = bin_dir / "llama-quantize"
    if not quant.exists():
        return None, f"{quant} is not built (run `make peers`)"
    if not (bin_dir / "libllama.so").exists():
        return None, f"{bin_dir}/libllama.so is not built (run `make peers`)"
    return LlamaCpp(src, bin_dir, quant), None


def import_llama_cpp():
    """The llama_cpp module bound to the cached shared libraries, or raise ImportError."""
    lib_dir = peers_dir() / "build" / "bin"
    if (lib_dir / "libllama.so").exists():
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lib_dir))
    import llama_cpp  # noqa: F401  (ImportError / OSError when missing or not loadable)
    return llama_cpp


def build(jobs: int = 2) -> LlamaCpp:
    """Download the llama-cpp-python sdist, build llama.cpp once (nice 19), install the bindings."""
    root = peers_dir()
    root.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if not glob.glob(str(root / "llama_cpp_python-*.tar.gz")):
        subprocess.run([py, "-m", "pip", "download", LLAMA_CPP_PYTHON, "--no-binary", ":all:",
                        "--no-deps", "-d", str(root)], check=True)
    sdist = sorted(glob.glob(str(root / "llama_cpp_python-*.tar.gz")))[-1]
    pkg = Path(sdist[:-len(".tar.gz")])
    if not pkg.exists():
        subprocess.run(["tar", "xzf", sdist, "-C", str(root)], check=True)
    build_dir = root / "build"
    subprocess.run(["nice", "-n", "19", "cmake", "-S", str(pkg / "vendor" / "llama.cpp"), "-B", str(build_dir),
                    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                    "-DLLAMA_BUILD_COMMON=ON", "-DGGML_NATIVE=ON"], check=True)
    subprocess.run(["nice", "-n", "19", "cmake", "--build", str(build_dir), "--target", "llama",
                    "llama-quantize", "-j", str(jobs)], check=True)
    # the bindings alone: LLAMA_BUILD=OFF skips compiling llama.cpp a second time
    env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
    pin = Path(sys.prefix) / "torch-pin.txt"       # never let pip swap the pinned torch
    subprocess.run([py, "-m", "pip", "install", *(["-c", str(pin)] if pin.exists() else []), str(pkg)],
                   check=True, env=env)
    found, why = find_llama_cpp()
    if found is None:
        raise RuntimeError(f"llama.cpp build finished but is incomplete: {why}")
    return found


if __name__ == "__main__":
    f = build()
    print(f"llama.cpp ready: libraries {f.lib_dir}, quantize {f.quantize}, converter {f.src}")
