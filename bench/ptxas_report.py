"""What ptxas makes of stripes' Triton kernels, on a machine without a GPU: every distinct
kernel launch that some tests make (under Triton's interpreter) compiled again for an NVIDIA
architecture, with its registers, spills, barriers and shared memory.

    python3 bench/ptxas_report.py [--arch 90] [--out FILE.json] -- PYTEST_ARGS...
    e.g. python3 bench/ptxas_report.py -- tests/test_kernel_modal_conv.py -k packed

Phase 1 runs pytest under TRITON_INTERPRET=1 with this module as a plugin, which records each
launch: kernel, argument types, constexpr values, num_warps and num_stages. Phase 2, in this
process without the interpreter, compiles each for sm_ARCH (`triton.compile` with a
GPUTarget needs no driver) and runs the wheel's own `ptxas -v` on the PTX. The tests' shapes
are tiny, but the code depends on types and constexprs (block sizes), which they share with
real launches; a launcher that derives block sizes from shapes is reported at the tests' sizes.
Arguments are specialized as Triton specializes the tests' own: pointers 16-byte aligned
and integers divisible by 16 are marked so (real shapes are more often divisible).
Compile errors that the interpreter forgives show up here as an error row.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD_ENV = "STRIPES_PTXAS_RECORD"  # phase 1 writes its launches to this file
OPTIONS = ("num_warps", "num_stages")
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                "bool": "i1"}


# -- phase 1: a pytest plugin that records launches ---------------------------------------------
def _arg_type(value) -> str | None:
    """Triton's signature type of a runtime argument (None: not one Triton types)."""
    if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
        return "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def _record(fn, args, kwargs, launches: dict) -> None:
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args, strict=False)) | {k: v for k, v in kwargs.items()
                                                     if k in params}
    signature, constexprs, divisible = {}, {}, []
    for name, param in params.items():
        value = bound.get(name, param.default)
        if "constexpr" in str(param.annotation) or value is None:
            constexprs[name] = value
            continue
        signature[name] = _arg_type(value)
        address = value.data_ptr() if hasattr(value, "data_ptr") else value
        if isinstance(address, int) and not isinstance(address, bool) and address % 16 == 0:
            divisible.append(name)  # what Triton's launcher marks tt.divisibility 16
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    entry = {"module": fn.__module__, "file": inspect.getsourcefile(fn), "kernel": fn.__name__,
             "signature": signature, "constexprs": constexprs, "divisible": divisible,
             "options": options}
    launches[json.dumps(entry, sort_keys=True, default=repr)] = entry


def pytest_configure(config) -> None:
    if RECORD_ENV not in os.environ:
        return
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict = {}
    config._stripes_ptxas_launches = launches
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        _record(self.fn, args, kwargs, launches)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def pytest_unconfigure(config) -> None:
    launches = getattr(config, "_stripes_ptxas_launches", None)
    if launches is not None:
        Path(os.environ[RECORD_ENV]).write_text(json.dumps(list(launches.values())))


# -- phase 2: compile each launch for the target and ask ptxas ----------------------------------
def _ptxas_info(ptx: str, arch: int) -> dict:
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), "-v", f"-arch=sm_{arch}a", str(src), "-o",
                               str(Path(tmp) / "kernel.o")], capture_output=True, text=True)
    text = done.stderr
    grab = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None
    return {"registers": grab(r"Used (\d+) registers"),
            "spill_bytes": grab(r"(\d+) bytes spill stores"),
            "barriers": grab(r"used (\d+) barriers")}


def _module(entry: dict):
    """The kernel's module: by name, or from its file when pytest imported it off sys.path."""
    try:
        return importlib.import_module(entry["module"])
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(entry["module"], entry["file"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def compile_launch(entry: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": f"{entry['module']}.{entry['kernel']}",
           "constexprs": {k: v for k, v in entry["constexprs"].items() if v is not None},
           "divisible": entry["divisible"], "num_warps": entry["options"].get("num_warps", 4)}
    try:
        fn = getattr(_module(entry), entry["kernel"])
        signature = {name: ("constexpr" if name in entry["constexprs"]
                            else entry["signature"][name]) for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name in entry["divisible"]}
        compiled = triton.compile(ASTSource(fn, signature, entry["constexprs"], attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": 4} | entry["options"])
        row.update(_ptxas_info(compiled.asm["ptx"], arch), shared_bytes=compiled.metadata.shared,
                   status="ok")
    except Exception as err:  # one kernel that does not compile must not hide the others
        reason = [line for line in str(err).splitlines() if line.strip()][-1:] or [""]
        row.update(status="error", error=f"{type(err).__name__}: {reason[0].strip()}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    pytest_args = [a for a in args.pytest_args if a != "--"]
    if not pytest_args:
        parser.error("give the tests to record after --, e.g. -- tests/test_kernel_ssd.py")
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "launches.json"
        env = os.environ | {"TRITON_INTERPRET": "1", RECORD_ENV: str(record),
                            "PYTHONPATH": os.pathsep.join(filter(None, [
                                str(ROOT / "bench"), os.environ.get("PYTHONPATH")]))}
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ptxas_report",
                                *pytest_args], cwd=ROOT, env=env, capture_output=True,
                               text=True)
        if not record.exists():
            print(tests.stdout[-2000:] + tests.stderr[-2000:], file=sys.stderr)
            print("ptxas_report: the tests recorded no launches", file=sys.stderr)
            return 1
        launches = json.loads(record.read_text())
    if not launches:
        print(f"ptxas_report: the tests launched no Triton kernel (pytest exit "
              f"{tests.returncode})", file=sys.stderr)
        return 1
    rows = [compile_launch(entry, args.arch) for entry in launches]
    print(f"sm_{args.arch}: {len(rows)} distinct launches (tests exit {tests.returncode})")
    print("| kernel | constexprs | warps | registers | spill bytes | barriers | shared B |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: r["kernel"]):
        if r["status"] == "ok":
            print(f"| {r['kernel']} | {r['constexprs']} | {r['num_warps']} | {r['registers']} "
                  f"| {r['spill_bytes']} | {r['barriers']} | {r['shared_bytes']} |")
        else:
            print(f"| {r['kernel']} | {r['constexprs']} | {r['num_warps']} | {r['error']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1, default=repr))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # phase 2 compiles for real
    sys.exit(main())
