"""The CPU GEMM of deform_conv2d (csrc/cpu/gemm.cpp) through its test handle torch.ops.eyecool_cpu.gemm:

    out[i, j] = (accumulate ? out[i, j] : 0) + sum_k rows[i, k] * columns[j, k]

Each ISA kernel this machine runs (AVX-512: tiles of 12 rows x 32 columns, AVX2: 6 x 16) against a float64
torch.matmul, on sizes that leave partial row tiles and partial panels (1, 7, 17, 33, ...), with the strided
layouts the op passes (a transposed output, transposed or strided columns, rows a stride apart), and bit for bit
against itself row by row (each element is one FMA chain over k whatever tile it lands in). The kernels a capped
EYECOOL_CPU_ISA refuses are checked to raise."""
import pytest
import torch

import eyecool_ext
from op_tester import needs_compiled

ISAS = ("avx2", "avx512")


def runnable_isas():
    if not eyecool_ext.compiled():
        return []
    current = eyecool_ext.cpu_isa()
    return [isa for isa in ISAS if ISAS.index(isa) <= ISAS.index(current)] if current in ISAS else []


def gemm(out, rows, columns, accumulate, isa):
    return torch.ops.eyecool_cpu.gemm(out, rows, columns, accumulate, isa)


def expected(rows, columns, initial=None):
    result = rows.double() @ columns.double().t()
    return result if initial is None else result + initial.double()


def tolerance(depth):
    # float32 sums of `depth` products of N(0, 1) values: the error grows like sqrt(depth) * eps * |terms|.
    return dict(atol=1e-5 * max(1, depth) ** 0.5 * 4, rtol=1e-5)


# The last three cross the kernel's depth blocks (256): exactly one block, one value over, and a partial third.
SIZES = [(1, 1, 1), (7, 17, 33), (17, 33, 7), (33, 65, 17), (12, 32, 100), (13, 31, 1), (25, 97, 64), (6, 16, 5),
         (25, 33, 256), (7, 65, 257), (13, 37, 600)]


@needs_compiled
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("accumulate", [False, True])
def test_matches_matmul_on_partial_tiles(isa, size, accumulate):
    if isa not in runnable_isas():
        pytest.skip(f"{isa} kernel does not run here (cpu_isa {eyecool_ext.cpu_isa()})")
    rows_n, cols_n, depth = size
    g = torch.Generator().manual_seed(rows_n * 1000 + cols_n * 10 + depth)
    rows = torch.randn(rows_n, depth, generator=g)
    columns = torch.randn(cols_n, depth, generator=g)
    initial = torch.randn(rows_n, cols_n, generator=g)
    out = initial.clone()
    result = gemm(out, rows, columns, accumulate, isa)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.double(), expected(rows, columns, initial if accumulate else None),
                               **tolerance(depth))


@needs_compiled
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["out_transposed", "columns_transposed", "columns_strided", "rows_strided"])
def test_strided_layouts(isa, layout):
    """The layouts deform_conv2d uses: the forward writes out[channel, pixel] (a transposed C), the backward
    packs panels from [k, j] sources (transposed columns) and reads grad rows a whole plane apart."""
    if isa not in runnable_isas():
        pytest.skip(f"{isa} kernel does not run here")
    g = torch.Generator().manual_seed(3)
    rows_n, cols_n, depth = 19, 45, 23
    rows = torch.randn(rows_n, depth, generator=g)
    columns = torch.randn(cols_n, depth, generator=g)
    out = torch.zeros(rows_n, cols_n)
    if layout == "out_transposed":
        out = torch.zeros(cols_n, rows_n).t()
    elif layout == "columns_transposed":
        columns = columns.t().contiguous().t()
    elif layout == "columns_strided":
        columns = torch.randn(cols_n * 2, depth * 3, generator=g)[::2, ::3]
    elif layout == "rows_strided":
        rows = torch.randn(rows_n, depth + 50, generator=g)[:, 7:7 + depth]
    gemm(out, rows, columns, False, isa)
    torch.testing.assert_close(out.double(), expected(rows, columns), **tolerance(depth))


@needs_compiled
@pytest.mark.parametrize("isa", ISAS)
def test_bitwise_independent_of_tiling(isa):
    """One row (or one column) computed alone equals the same element of the whole product bit for bit, and a
    second call repeats the first: the sums are fixed FMA chains over k, whatever tile or panel holds them."""
    if isa not in runnable_isas():
        pytest.skip(f"{isa} kernel does not run here")
    g = torch.Generator().manual_seed(5)
    for depth in (77, 600):  # 600: three depth blocks, whose chains pass through memory between blocks
        _check_tiling_independence(isa, torch.randn(29, depth, generator=g), torch.randn(41, depth, generator=g))


def _check_tiling_independence(isa, rows, columns):
    whole = gemm(torch.empty(29, 41), rows, columns, False, isa)
    assert torch.equal(whole, gemm(torch.empty(29, 41), rows, columns, False, isa))
    for i in (0, 11, 12, 28):
        assert torch.equal(gemm(torch.empty(1, 41), rows[i:i + 1], columns, False, isa), whole[i:i + 1])
    for j in (0, 15, 31, 40):
        assert torch.equal(gemm(torch.empty(29, 1), rows, columns[j:j + 1], False, isa), whole[:, j:j + 1])


@needs_compiled
def test_empty_and_zero_depth():
    for isa in runnable_isas():
        out = torch.full((3, 4), 2.0)
        gemm(out, torch.empty(3, 0), torch.empty(4, 0), True, isa)
        assert torch.equal(out, torch.full((3, 4), 2.0))  # nothing added
        gemm(out, torch.empty(3, 0), torch.empty(4, 0), False, isa)
        assert torch.equal(out, torch.zeros(3, 4))
        assert gemm(torch.empty(0, 4), torch.empty(0, 5), torch.randn(4, 5), False, isa).shape == (0, 4)


@needs_compiled
def test_bad_arguments_name_what_was_expected():
    rows, columns = torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="isa must be 'best', 'avx512' or 'avx2'"):
        gemm(torch.empty(3, 4), rows, columns, False, "sse")
    with pytest.raises(RuntimeError, match="shapes do not match"):
        gemm(torch.empty(3, 3), rows, columns, False, "best")
    with pytest.raises(RuntimeError, match="float32 tensors only"):
        gemm(torch.empty(3, 4, dtype=torch.float64), rows.double(), columns.double(), False, "best")
    with pytest.raises(RuntimeError, match="contiguous in k"):
        gemm(torch.empty(3, 4), torch.randn(5, 3).t(), columns, False, "best")


@needs_compiled
def test_a_kernel_above_the_cap_is_refused():
    """Under EYECOOL_CPU_ISA=avx2 (or on an AVX2 CPU) the AVX-512 kernel raises instead of running; on the
    baseline neither runs and 'best' names the missing kernel."""
    runnable = runnable_isas()
    refused = [isa for isa in ISAS if isa not in runnable]
    if not refused:
        pytest.skip("every kernel runs here (run this file under EYECOOL_CPU_ISA=avx2 or baseline)")
    for isa in refused:
        with pytest.raises(RuntimeError, match="does not run on this CPU"):
            gemm(torch.empty(2, 2), torch.randn(2, 3), torch.randn(2, 3), False, isa)
    assert torch.ops.eyecool_cpu.gemm_isa() == eyecool_ext.cpu_isa()
