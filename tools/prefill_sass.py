"""Where ptxas puts the prefill kernel's instructions: its SASS, loop by loop (Hopper).

Compiles `_mosaic_prefill.paged_prefill` once with Mosaic GPU's PTX dump on, assembles the PTX
for sm_90a with `ptxas` and disassembles it with `nvdisasm` (from a CUDA toolkit, or the
nvidia-cuda-nvcc and nvidia-cuda-nvdisasm wheels), then prints, for each innermost loop that
issues wgmmas (the kernel's per-step loops): its opcode counts, and its synchronization,
matmul and softmax instructions in issue order with runs collapsed (`MUFU.EX2 x64`). That order
is what the PTX does not show: ptxas schedules register arithmetic freely across mbarrier
arrivals and waits, so a barrier arrival written after the softmax can issue before it, and it
moves a wgmma wait (`WARPGROUP.DEPBAR.LE gsb0, N`: at most N groups left in flight) up to where
it reuses a register the wgmma still reads. First it prints what `ptxas -v` said of the kernel:
its wgmma notes (C75xx: serialized wgmmas, injected waits or fences), registers and spills.

    PYTHONPATH=. python tools/prefill_sass.py                  # on a Hopper GPU
    python tools/prefill_sass.py --ptx entry_0.ptx             # an earlier dump, any machine
    PYTHONPATH=. python tools/prefill_sass.py --keep-ptx k.ptx # keep this build's PTX
    python tools/prefill_sass.py --sass kernel.sass            # a disassembly
"""

from __future__ import annotations

import argparse
import collections
import glob
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile

# Instructions shown in the order line (by opcode prefix); everything else is only counted.
ORDER_OPS = (
    "HGMMA",
    "WARPGROUP",
    "SYNCS",
    "BAR",
    "SHFL",
    "MUFU",
    "F2FP",
    "PRMT",
    "STS",
    "LDS",
)
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)")
_OPERAND = re.compile(r"\[[^\]]*\]")
_DEPBAR_COUNT = re.compile(r"gsb0,\s*(0x[0-9a-f]+)")
# `ptxas -v` lines worth reading for a wgmma kernel.
_PTXAS_NOTE = re.compile(r"\(C75\d\d\)|registers|spill")
_LABEL = re.compile(r"^\s*\.?(L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b[^`]*`?\(?\.?(L_x_\d+)")


def parse_sass(text: str) -> tuple[list[str], dict[str, int], list[str]]:
    """(opcodes, label -> index of the next instruction, raw instruction lines) of an nvdisasm
    listing."""
    ops: list[str] = []
    lines: list[str] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(ops)
        elif m := _INSTR.search(line):
            ops.append(m.group(1))
            lines.append(line)
    return ops, labels, lines


def innermost_loops(ops: list[str], labels: dict[str, int], lines: list[str]) -> list[range]:
    """Instruction ranges of loops (a branch back to a label) that contain no other loop and
    issue at least one wgmma."""
    loops = []
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            loops.append(range(labels[m.group(1)], i + 1))
    inner = [
        r
        for r in loops
        if not any(o != r and o.start >= r.start and o.stop <= r.stop for o in loops)
    ]
    return [r for r in inner if any(ops[i].startswith("HGMMA") for i in r)]


def order_line(ops: list[str], lines: list[str]) -> str:
    """The ORDER_OPS instructions of `ops` in order (barrier operations with their address
    operand, which tells the barriers apart), runs of one instruction collapsed."""
    shown = []
    for op, line in zip(ops, lines, strict=True):
        if op.startswith("SYNCS") and (m := _OPERAND.search(line)):
            op = f"{op} {m.group(0)}"
        elif op.startswith("WARPGROUP.DEPBAR") and (m := _DEPBAR_COUNT.search(line)):
            op = f"{op} {m.group(1)}"
        if op.startswith(ORDER_OPS):
            shown.append(op)
    runs = [(op, len(list(run))) for op, run in itertools.groupby(shown)]
    return " | ".join(op if n == 1 else f"{op} x{n}" for op, n in runs)


def summarize(text: str) -> list[dict]:
    """Per innermost wgmma loop: its first instruction's index, length, opcode counts, order."""
    ops, labels, lines = parse_sass(text)
    out = []
    for r in innermost_loops(ops, labels, lines):
        body = ops[r.start : r.stop]
        out.append(
            {
                "start": r.start,
                "instructions": len(body),
                "counts": dict(collections.Counter(body).most_common()),
                "order": order_line(body, lines[r.start : r.stop]),
            }
        )
    return out


def _tool(name: str) -> str:
    """A CUDA tool on PATH, else from an installed nvidia-* wheel."""
    found = shutil.which(name)
    if not found:
        for base in sys.path:
            hits = sorted(glob.glob(os.path.join(base, "nvidia", "*", "bin", name)))
            if hits:
                found = hits[0]
                break
    if not found:
        raise SystemExit(f"{name} not found: install a CUDA toolkit or the nvidia-cuda-* wheels")
    return found


def ptxas_notes(text: str) -> list[str]:
    """The lines of `ptxas -v` output about wgmma serialization, registers and spills."""
    return [line.strip() for line in text.splitlines() if _PTXAS_NOTE.search(line)]


def sass_of_ptx(ptx_path: str, workdir: str) -> tuple[str, list[str]]:
    """(disassembly, `ptxas_notes`) of a PTX file assembled for sm_90a."""
    cubin = os.path.join(workdir, "kernel.cubin")
    done = subprocess.run(
        [_tool("ptxas"), "-arch=sm_90a", "-O3", "-v", "-o", cubin, ptx_path],
        check=True,
        capture_output=True,
        text=True,
    )
    sass = subprocess.run(
        [_tool("nvdisasm"), "-c", cubin], check=True, capture_output=True, text=True
    ).stdout
    return sass, ptxas_notes(done.stdout + done.stderr)


def dump_ptx(head_dim: int, page: int, workdir: str) -> str:
    """The PTX Mosaic GPU generates for the prefill kernel at this head dim and page size."""
    os.environ["MOSAIC_GPU_DUMP_PTX"] = "1"
    os.environ["MOSAIC_GPU_DUMP_TO"] = workdir
    import jax
    import jax.numpy as jnp

    from jaxserve.bench.kernels import PrefillCase, paged_prefill_args, prefill_inputs
    from pallas_kernels import _mosaic_prefill

    case = PrefillCase(2, 1024, page=page, q_heads=16, kv_heads=4, head_dim=head_dim)
    x = prefill_inputs(case, jnp.bfloat16, jax.random.key(0))
    inputs = paged_prefill_args(x)
    _mosaic_prefill.paged_prefill(*inputs, scale=head_dim**-0.5).block_until_ready()
    (ptx,) = glob.glob(os.path.join(workdir, "*.ptx"))
    return ptx


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--ptx", metavar="PATH", help="assemble this PTX instead of compiling")
    p.add_argument("--sass", metavar="PATH", help="read this disassembly instead")
    p.add_argument("--keep-ptx", metavar="PATH", help="copy the PTX compiled here to PATH")
    args = p.parse_args(argv)
    if args.sass:
        with open(args.sass) as f:
            text = f.read()
    else:
        with tempfile.TemporaryDirectory() as workdir:
            ptx = args.ptx or dump_ptx(args.head_dim, args.page, workdir)
            if args.keep_ptx:
                shutil.copyfile(ptx, args.keep_ptx)
            text, notes = sass_of_ptx(ptx, workdir)
        for note in notes:
            print(f"ptxas: {note}")
    loops = summarize(text)
    for loop in loops:
        counts = ", ".join(f"{op} {n}" for op, n in list(loop["counts"].items())[:16])
        print(f"loop at instruction {loop['start']}: {loop['instructions']} instructions")
        print(f"  counts: {counts}")
        print(f"  order:  {loop['order']}")
    return loops


if __name__ == "__main__":
    main()
