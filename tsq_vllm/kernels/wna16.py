"""CPU backend through vLLM's own WNA16 kernel, `torch.ops._C.cpu_gemm_wna16`.

The op (vLLM's CPU wheels, x86 builds with AVX-512, ARM and RISC-V) multiplies 16-bit activations
by a weight of 4-bit lanes. Per call and per block of output columns it decodes the lanes into a
16-bit buffer, w = bf16(s · (q - z)) with q and z read through the table 0..15 and the product
formed in fp32, then runs an fp32-accumulating micro-GEMM (AVX-512 FMA, or AMX tiles on CPUs that
have them). Its rules, from the op's checks and vLLM's own use of it
(`CPUWNA16LinearKernel`): pack_factor 8 (4-bit lanes only), K % 32 == 0, N % 32 == 0, one group
size G = K / n_groups with G even, bf16 or fp16 activations (the same dtype for scales, bias and
output), and in this vLLM version no g_idx argument.

Repack (once, at load, `prepare_wna16`). A GPTQ layer decodes W[k, n] = s[g, n] · (c[k, n] - z[g,
n]) with g = g_idx[k]; the stored qzeros hold z - 1 ("gptq", v1) or z ("gptq_v2"), and
`GPTQLayer.unpack` returns the true z, so both formats reach the kernel as the same integers:

  codes   c in [0, 2^b)                         -> the 4-bit lane q = c, for b = 2, 3, 4
  zeros   z in [0, 2^b] (v1: [1, 2^b])          -> the 4-bit lane z, which must be <= 15
  scales  s fp16                                -> s in the activation dtype (bf16 rounds it)

so s · (q - z) is the reference decode term for term; 2- and 3-bit codes simply leave the upper
lane bits zero, and z <= 2^b <= 8 always fits. At 4 bits a v1 zero of 16 (stored 15) does not fit
a lane: `can_implement` refuses such a layer (the aten int4 path in `kernels.cpu` carries the zero
as a float and takes it). Shapes, with N_pad = N rounded up to 32 (padded columns have code 0,
zero 0, scale 0 and are sliced off):

  q_weight int32 [N_pad/16, 2K]      row j holds output columns 16j..16j+15: for each k, two
                                     words with columns 16j+i at bits 4i (i < 8) of the first and
                                     16j+8+i of the second (the GPTQ 4-bit word, packed along N)
  zeros    int32 [n_groups, N_pad/8] z packed along N in the same word layout (GPTQ
                                     qzeros at 4 bits)
  scales   act   [n_groups, N_pad]

Act-order (a g_idx that is not k // G) has no kernel support here, so the input columns are
sorted by group once at load (the same regrouping the aten int4 path does) and every call gathers
x's columns in that order; layers whose groups do not regroup into whole blocks of G columns are
refused. Exactness against `GPTQLayer.dequantize`: s and the decoded weight are each rounded
once to the activation dtype, the sum is fp32, the output is rounded once.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..format.gptq import GPTQLayer
from ..format.packing import pack
from .cpu import _as_rows, group_blocks

__all__ = [
    "WNA16Linear",
    "can_implement",
    "prepare_wna16",
    "wna16_available",
    "wna16_unavailable_reason",
]

logger = logging.getLogger(__name__)

_BITS = (2, 3, 4)
_ACT_DTYPES = (torch.bfloat16, torch.float16)
_LANE_MAX = 15  # largest value a 4-bit lane holds
_N_ALIGN = 32  # the op's N rule and its micro-GEMM's N tile
_K_ALIGN = 32
_N_BLOCK = 16  # output columns per row of q_weight


@functools.cache
def wna16_unavailable_reason() -> str | None:
    """Why `cpu_gemm_wna16` cannot be called in this process, or None when it can.

    Checked at run time, once: vLLM must import, be on its CPU platform, load its kernels, and
    the loaded kernel library must contain the op (vLLM's AVX2 build `_C_AVX2` lacks it).
    """
    try:
        from vllm.platforms import current_platform
    except Exception as e:  # vLLM missing or broken: any import error means the same here
        return f"vLLM is not importable ({type(e).__name__}: {e})"
    if not current_platform.is_cpu():
        name = type(current_platform).__name__
        return f"vLLM's platform is {name}, not CPU: cpu_gemm_wna16 ships in vLLM's CPU builds"
    try:
        current_platform.import_kernels()
    except Exception as e:
        return f"vLLM's CPU kernels failed to load ({type(e).__name__}: {e})"
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return (
            "the loaded vLLM kernel library has no cpu_gemm_wna16 (vLLM loads its AVX2 build on "
            "CPUs without AVX-512; "
            f"torch.cpu._is_avx512_supported()={torch.cpu._is_avx512_supported()})"
        )
    return None


def wna16_available() -> bool:
    """Whether vLLM's CPU WNA16 op can be called here (vLLM importable, kernels loaded, op
    present)."""
    return wna16_unavailable_reason() is None


def _isa_hint(act_dtype: torch.dtype) -> str | None:
    """The op's micro-GEMM for this CPU, as vLLM chooses it; None where this backend does not go."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return (
            "amx" if act_dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"
        )
    if machine in ("aarch64", "arm64"):
        return "vec"
    return None


def _block_layout(layer: GPTQLayer) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """(perm, block_group) of `cpu.group_blocks` for any group size: the input-column order that
    makes every group whole runs of G columns (None if already so) and the group of each run; None
    when the groups cannot be so arranged."""
    if layer.g_idx is None:
        return None, torch.arange(layer.K // layer.group_size)
    return group_blocks(layer.g_idx, layer.group_size)


def can_implement(layer: GPTQLayer, act_dtype: torch.dtype) -> tuple[bool, str | None]:
    """Whether `prepare_wna16` can serve `layer` with `act_dtype` activations, and if not, why.

    Reads the zero points and g_idx (values, not just shapes): call it at load time. The op's
    K % 32 and even-G rules need no check: `GPTQLayer` only holds groups of a multiple of 32
    columns that split K. N of any size is served by padding to 32.
    """
    reason = wna16_unavailable_reason()
    if reason is not None:
        return False, reason
    if act_dtype not in _ACT_DTYPES:
        return (
            False,
            f"activation dtype {act_dtype} is not supported by cpu_gemm_wna16: it takes bfloat16 "
            "or float16",
        )
    if _isa_hint(act_dtype) is None:
        return False, (
            f"CPU architecture {platform.machine()!r} has no cpu_gemm_wna16 path in this backend "
            "(it serves x86-64 and ARM)"
        )
    if layer.qweight.device.type != "cpu":
        return False, f"the layer is on {layer.qweight.device}: cpu_gemm_wna16 runs on CPU tensors"
    if layer.bits not in _BITS:
        return (
            False,
            f"bits={layer.bits} does not fit the kernel's 4-bit lanes: it serves bits {_BITS}",
        )
    if layer.g_idx is not None and _block_layout(layer) is None:
        return False, (
            f"act-order g_idx does not regroup into whole blocks of group_size={layer.group_size} "
            "columns, and cpu_gemm_wna16 takes no g_idx"
        )
    _, zeros = layer.unpack()
    if zeros.numel() and int(zeros.max()) > _LANE_MAX:
        return False, (
            f"a zero point of {int(zeros.max())} does not fit the kernel's 4-bit zero lanes (at "
            f"most {_LANE_MAX}); {layer.checkpoint_format!r} stores it as "
            f"{int(zeros.max()) - layer.zero_offset}"
        )
    return True, None


@dataclass(frozen=True)
class WNA16Linear:
    """One linear layer prepared for `cpu_gemm_wna16`: y = x · W (+ bias), W [K, N] as the reference
    decodes it. Tensor layouts are in the module docstring; `perm` is the input-column order (None
    when g_idx is k // G). Built by `prepare_wna16`."""

    qweight: torch.Tensor  # int32 [N_pad/16, 2K]
    zeros: torch.Tensor  # int32 [n_groups, N_pad/8]
    scales: torch.Tensor  # act_dtype [n_groups, N_pad]
    perm: torch.Tensor | None
    K: int
    N: int
    act_dtype: torch.dtype
    isa_hint: str

    def __post_init__(self) -> None:
        n_pad = self.scales.shape[1]
        if n_pad % _N_ALIGN or n_pad < self.N or self.K % _K_ALIGN:
            raise ValueError(
                f"N_pad={n_pad}, N={self.N}, K={self.K}: need N <= N_pad, N_pad % 32 == 0, K % 32 "
                "== 0"
            )
        if (
            tuple(self.qweight.shape) != (n_pad // _N_BLOCK, 2 * self.K)
            or self.qweight.dtype != torch.int32
        ):
            raise ValueError(
                f"qweight {tuple(self.qweight.shape)} {self.qweight.dtype}: expected int32 "
                f"[{n_pad // 16}, {2 * self.K}]"
            )
        if (
            tuple(self.zeros.shape) != (self.scales.shape[0], n_pad // 8)
            or self.zeros.dtype != torch.int32
        ):
            raise ValueError(
                f"zeros {tuple(self.zeros.shape)}: expected int32 [{self.scales.shape[0]}, "
                f"{n_pad // 8}]"
            )
        if self.scales.dtype != self.act_dtype or self.act_dtype not in _ACT_DTYPES:
            raise ValueError(
                f"scales dtype {self.scales.dtype} must equal act_dtype {self.act_dtype} (bf16 or "
                "fp16)"
            )

    @property
    def n_pad(self) -> int:
        return self.scales.shape[1]

    def nbytes(self) -> int:
        """Bytes held by the prepared tensors (what serving keeps resident)."""
        tensors = [self.qweight, self.zeros, self.scales, self.perm]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] in any float dtype (computed in act_dtype) -> y [..., N] in x's dtype."""
        lead = x.shape[:-1]
        xa = _as_rows(x, self.K).to(self.act_dtype)
        # The op reads rows with stride(0) and assumes unit column stride; index_select is
        # contiguous.
        xa = xa.index_select(1, self.perm) if self.perm is not None else xa.contiguous()
        padded = self.n_pad != self.N
        if bias is not None:
            # The op adds the bias in fp32 before its one output rounding; it reads N_pad entries.
            bias = bias.to(self.act_dtype)
            bias = F.pad(bias, (0, self.n_pad - self.N)) if padded else bias.contiguous()
        y = torch.empty(xa.shape[0], self.n_pad, dtype=self.act_dtype)
        if xa.shape[0]:
            torch.ops._C.cpu_gemm_wna16(
                xa, self.qweight, y, self.scales, self.zeros, bias, 8, self.isa_hint
            )
        if padded:
            y = y[:, : self.N]
        return y.to(x.dtype).reshape(*lead, self.N)


def prepare_wna16(layer: GPTQLayer, *, act_dtype: torch.dtype = torch.bfloat16) -> WNA16Linear:
    """Repack one layer's GPTQ tensors (checkpoint layout) for `cpu_gemm_wna16`, once at load.

    Raises ValueError with `can_implement`'s reason when the kernel cannot serve the layer.
    """
    layer.check_g_idx()
    ok, reason = can_implement(layer, act_dtype)
    if not ok:
        raise ValueError(f"cpu_gemm_wna16 cannot serve this {layer.bits}-bit layer: {reason}")
    layout = _block_layout(layer)
    assert layout is not None  # can_implement checked it
    perm, block_group = layout
    K, N, G = layer.K, layer.N, layer.group_size
    n_pad = -N % _N_ALIGN
    codes, zeros = layer.unpack()  # [K, N], [n_groups, N] int32, zeros are the true z
    if perm is not None:
        codes = codes.index_select(0, perm)
    codes = F.pad(codes, (0, n_pad))
    zeros = F.pad(zeros.index_select(0, block_group), (0, n_pad))
    scales = F.pad(layer.scales.float().index_select(0, block_group), (0, n_pad))
    words = pack(codes, 4, dim=1)  # [K, N_pad/8]: column 8w+i at bits 4i of word w
    # Two words (16 columns) per k, all K of one 16-column block contiguous: [N_pad/16, 2K].
    qweight = words.view(K, -1, 2).permute(1, 0, 2).reshape(-1, 2 * K).contiguous()
    hint = _isa_hint(act_dtype)
    assert hint is not None
    logger.debug(
        "cpu_gemm_wna16: %d-bit K=%d N=%d G=%d act-order=%s isa=%s",
        layer.bits,
        K,
        N,
        G,
        perm is not None,
        hint,
    )
    return WNA16Linear(
        qweight=qweight,
        zeros=pack(zeros, 4, dim=1).contiguous(),
        scales=scales.to(act_dtype).contiguous(),
        perm=perm,
        K=K,
        N=N,
        act_dtype=act_dtype,
        isa_hint=hint,
    )
