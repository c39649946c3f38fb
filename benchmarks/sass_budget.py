"""Instruction budget of deform_conv2d's sampling kernels, read from the sm_90 SASS of the CUDA build.

No GPU is needed: the numbers come from the compiled object. Build first (``FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0
make install`` leaves ``build/temp/csrc/cuda/deform_conv2d.o``), then ``python benchmarks/sass_budget.py``
(``--object`` another object, ``--markdown`` a Markdown table instead of text).

Method
------
1. ``cuobjdump -xelf all`` takes the sm_90 cubin out of the object and ``nvdisasm -c`` disassembles it: unlike
   ``cuobjdump -sass`` it prints branch targets as labels (``.L_x_12``) and names the subroutines that nvcc
   calls (``$__internal_3_$__cuda_sm20_div_s64``). The CUDA toolkit on these machines has no cuobjdump on PATH;
   the copies shipped with the ``triton`` package are used (else PATH, else ``$CUDA_HOME/bin``).
2. Each kernel (``.text.<mangled name>`` section) is split into instructions with their addresses. A loop is a
   backward branch: ``BRA`` to a label at or before the branch; its body is every instruction from the target to
   the branch, both included (static count: an instruction on a branch that is rarely taken counts like any
   other, and a called subroutine's own instructions are not counted in the loop; they are listed apart).
3. The per-element loop is, among the innermost loops (those that contain no other loop) that load from global
   memory, the one that handles the most column elements per iteration (so nvcc's unrolled main loop, not its
   remainder loop, and not im2col's loop that stores the zeros of a sample wholly outside the image). Elements
   per iteration are counted from the memory operations that touch the column buffer once per element: im2col stores one column element (``STG``); col2im scatters each
   element to four input taps (``RED``/``ATOM``, 4 per element); coordinate_grad loads one column element and
   four input taps (``LDG``, 5 per element). Before the redesign the innermost loop of im2col and col2im is the
   grid-stride loop over column elements itself (1 element per iteration); after it, it is the loop over an
   offset group's channels, possibly unrolled by nvcc (so several elements per iteration).
   Of loops with equal elements per iteration the shortest is taken (col2im has one loop for samples whose four
   taps are all inside the image, without a branch per atomic, and one for samples on the border); the other
   loops that handle column elements (nvcc's remainder loops, col2im's border loop) are listed apart, as
   instructions per element / elements per iteration.
4. Instructions per column element = loop instructions / elements per iteration. ``per sample`` is what the
   enclosing loop spends outside the per-element loop (index split, offsets, mask, bilinear taps): once per
   (image, offset group, kernel tap, output pixel), shared by the group's channels.
5. Integer division. nvcc 13 compiles a 64-bit ``/`` or ``%`` by a value unknown at compile time (sm_90) as a test
   of the operands' high words, then either an inlined 32-bit unsigned division (``I2F.U32.RP``, ``MUFU.RCP``,
   ``F2I``, ``IMAD.HI`` and a fix-up: about 20 instructions) or a ``CALL.REL`` to the 64-bit divider
   ``__cuda_sm20_div_s64`` / ``rem_s64`` / ``div_u64`` / ``rem_u64`` (about 80 instructions, which itself starts
   with ``I2F.U64.RP`` + ``MUFU.RCP``); a 32-bit division is the inlined sequence alone. ``calls`` counts the
   ``CALL`` sites to a routine whose name contains ``div`` or ``rem``; ``inlined`` counts ``I2F.U32.RP`` /
   ``I2F.U64.RP`` instructions (the start of every reciprocal-based division sequence) in the code itself, not in
   the called routines. A multiply-high by a precomputed magic number (a fast divider) is neither.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OBJECT = ROOT / "build" / "temp" / "csrc" / "cuda" / "deform_conv2d.o"
HOT_KERNELS = ("im2col_kernel", "col2im_kernel", "coordinate_grad_kernel")
DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}
INDEX_TYPES = {"unsigned int": "32-bit", "unsigned long": "64-bit", "unsigned long long": "64-bit",
               "int": "32-bit", "long": "64-bit"}

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+|\$[\w$]+):\s*$")
_SECTION = re.compile(r"^\.text\.(\S+):\s*$")
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+`\((\.L_x_\d+)\)")
_CALL = re.compile(r"^(?:@!?U?P\w+\s+)?CALL\.\S+\s+`\((\$[\w$]+)\)")


def find_tool(name: str) -> str:
    """cuobjdump / nvdisasm: the triton package's copy, else PATH, else $CUDA_HOME/bin."""
    try:
        import triton  # noqa: PLC0415

        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    sys.exit(f"sass_budget: {name} not found (triton package, PATH, CUDA_HOME)")


def disassemble(obj: Path) -> str:
    """nvdisasm text of the object's sm_90 cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([find_tool("cuobjdump"), "-xelf", "all", str(obj)], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        cubins = sorted(Path(tmp).glob("*sm_90*.cubin"))
        if not cubins:
            sys.exit(f"sass_budget: {obj} holds no sm_90 cubin (build with TORCH_CUDA_ARCH_LIST=9.0)")
        return subprocess.run([find_tool("nvdisasm"), "-c", str(cubins[0])], check=True, capture_output=True,
                              text=True).stdout


@dataclasses.dataclass
class Instruction:
    address: int
    text: str  # predicate, opcode and operands

    @property
    def opcode(self) -> str:
        words = self.text.split()
        return words[1] if words[0].startswith("@") else words[0]


@dataclasses.dataclass
class Kernel:
    mangled: str
    instructions: list[Instruction]
    labels: dict[str, int]  # label -> address of the instruction after it
    subroutines: dict[str, int]  # $__internal_... -> its first address

    def own_code(self) -> list[Instruction]:
        """The kernel's instructions without the subroutines appended to it."""
        start = min(self.subroutines.values(), default=None)
        return [i for i in self.instructions if start is None or i.address < start]

    def subroutine_size(self, name: str) -> int:
        starts = sorted(self.subroutines.values())
        begin = self.subroutines[name]
        end = next((s for s in starts if s > begin), None)
        body = [i for i in self.instructions if i.address >= begin and (end is None or i.address < end)]
        # Up to its RET: what follows is alignment padding (NOPs and a branch to itself).
        last = next((n for n, i in enumerate(body) if i.opcode.startswith("RET")), len(body) - 1)
        return last + 1


def parse(text: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    pending: list[str] = []
    for line in text.splitlines():
        if m := _SECTION.match(line):
            kernels.append(Kernel(m.group(1), [], {}, {}))
            pending = []
        elif not kernels:
            continue
        elif m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTRUCTION.match(line):
            address = int(m.group(1), 16)
            for label in pending:
                if label.startswith("$"):
                    kernels[-1].subroutines[label] = address
                kernels[-1].labels[label] = address
            pending = []
            kernels[-1].instructions.append(Instruction(address, m.group(2)))
    return kernels


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def loops(kernel: Kernel) -> list[tuple[int, int]]:
    """(first, last) addresses of every backward branch's body, in the kernel's own code."""
    found = []
    for ins in kernel.own_code():
        if (m := _BRANCH.match(ins.text)) and kernel.labels[m.group(1)] <= ins.address:
            found.append((kernel.labels[m.group(1)], ins.address))
    return found


def elements_per_iteration(kind: str, body: list[Instruction]) -> float:
    ops = [i.opcode for i in body]
    if kind == "im2col_kernel":
        return sum(op.startswith("STG") for op in ops)
    if kind == "col2im_kernel":
        return sum(op.startswith(("RED", "ATOM")) for op in ops) / 4
    return sum(op.startswith("LDG") for op in ops) / 5


def divisions(kernel: Kernel, body: list[Instruction]) -> tuple[int, int]:
    """(calls to an integer-division routine, inlined reciprocal-based division sequences) in body."""
    calls = inlined = 0
    for ins in body:
        if (m := _CALL.match(ins.text)) and re.search(r"div|rem", m.group(1)):
            calls += 1
        if ins.opcode in ("I2F.U32.RP", "I2F.U64.RP"):
            inlined += 1
    return calls, inlined


@dataclasses.dataclass
class Row:
    kernel: str
    dtype: str
    index: str
    loop_instructions: int
    elements: float
    per_sample: int | None
    loop_divisions: tuple[int, int]
    kernel_divisions: tuple[int, int]
    divider_size: int
    other_loops: list[tuple[float, int]]  # (instructions per element, elements per iteration) of the others

    @property
    def per_element(self) -> float:
        return self.loop_instructions / self.elements


def measure(kernel: Kernel, kind: str, dtype: str, index: str) -> Row:
    code = kernel.own_code()
    spans = loops(kernel)
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]

    def body(span):
        return [i for i in code if span[0] <= i.address <= span[1]]

    # Only loops that read memory: im2col's loop that fills the columns of a sample wholly outside the image
    # with zeros (stores only, cheaper) is not the one that bounds the kernel.
    scored = [(elements_per_iteration(kind, body(s)), s) for s in innermost
              if any(i.opcode.startswith("LDG") for i in body(s))]
    scored = [(e, len(body(s)), s) for e, s in scored if e > 0]
    for e, _, _ in scored:
        if e != int(e):
            raise RuntimeError(f"{kernel.mangled}: {e} column elements per iteration is not an integer")
    # Most elements per iteration; of equals, the shortest (col2im's loop for samples with all four taps inside
    # the image, rather than its loop for samples on the border).
    elements, _, span = max(scored, key=lambda x: (x[0], -x[1]))
    others = [(n / e, int(e)) for e, n, s in scored if s != span]
    loop_body = body(span)
    # The loop around the per-element loop (the grid-stride loop over samples), if there is one.
    outer = [s for s in spans if s != span and s[0] <= span[0] and span[1] <= s[1]]
    per_sample = None
    if outer:
        enclosing = min(outer, key=lambda s: s[1] - s[0])
        inner = [s for s in spans if enclosing[0] <= s[0] and s[1] <= enclosing[1] and s != enclosing]
        per_sample = sum(1 for i in body(enclosing) if not any(s[0] <= i.address <= s[1] for s in inner))
    divider = max((kernel.subroutine_size(n) for n in kernel.subroutines if re.search(r"div|rem", n)), default=0)
    return Row(kind.removesuffix("_kernel"), dtype, index, len(loop_body), int(elements), per_sample,
               divisions(kernel, loop_body), divisions(kernel, code), divider, sorted(others))


def table(rows: list[Row], markdown: bool) -> str:
    header = ["kernel", "dtype", "index", "loop instr", "elements/iter", "instr/element", "per sample",
              "div in loop (calls+inlined)", "div in kernel (calls+inlined)", "divider routine",
              "other loops (instr/element, elements/iter)"]
    lines = []
    for r in rows:
        lines.append([r.kernel, r.dtype, r.index, str(r.loop_instructions), str(int(r.elements)),
                      f"{r.per_element:.1f}", "-" if r.per_sample is None else str(r.per_sample),
                      f"{r.loop_divisions[0]}+{r.loop_divisions[1]}",
                      f"{r.kernel_divisions[0]}+{r.kernel_divisions[1]}",
                      f"{r.divider_size} instr" if r.divider_size else "-",
                      " ".join(f"{n:.1f}/{e}" for n, e in r.other_loops) or "-"])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(line.rstrip() for line in [fmt.format(*header), fmt.format(*("-" * w for w in widths))] +
                     [fmt.format(*line) for line in lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--object", type=Path, default=DEFAULT_OBJECT, help="nvcc object with an sm_90 cubin")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    if not args.object.is_file():
        sys.exit(f"sass_budget: {args.object} not found; build with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 make install")
    kernels = parse(disassemble(args.object))
    rows = []
    for kernel, name in zip(kernels, demangle([k.mangled for k in kernels])):
        kind = next((k for k in HOT_KERNELS if f"::{k}<" in name), None)
        if kind is None:
            continue
        template = re.search(rf"{kind}<(.*?)>\(", name).group(1).split(", ")
        dtype = DTYPES[template[0]]
        index = INDEX_TYPES[template[1]] if len(template) > 1 else "64-bit"
        rows.append(measure(kernel, kind, dtype, index))
    order = {k.removesuffix("_kernel"): i for i, k in enumerate(HOT_KERNELS)}
    dtypes = list(DTYPES.values())
    rows.sort(key=lambda r: (order[r.kernel], r.index, dtypes.index(r.dtype)))
    print(table(rows, args.markdown))


if __name__ == "__main__":
    main()
