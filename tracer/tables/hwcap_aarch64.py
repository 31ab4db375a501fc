"""arm64 hardware capability flags of AT_HWCAP and AT_HWCAP2, from the kernel's
arch/arm64/include/uapi/asm/hwcap.h as of Linux 6.15 (its AT_HWCAP3 section still empty):
AT_HWCAP bits 0-47 (62 and 63 are reserved for libc), AT_HWCAP2 bits 0-63. Names without the
HWCAP_/HWCAP2_ prefix; /proc/cpuinfo's "Features" line names the same bits in lower case
without underscores (arch/arm64/kernel/cpuinfo.c).

Only for aarch64 processes: tracer.arch.aarch64 gives this table (Arch.hwcap_names), and
tracer.auxv asks the traced process's arch, never the host's.
"""
from __future__ import annotations

from enum import IntFlag

__all__ = ["HwcapAarch64", "Hwcap2Aarch64"]


class HwcapAarch64(IntFlag):  # HWCAP_*, for AT_HWCAP
    FP = 1 << 0
    ASIMD = 1 << 1
    EVTSTRM = 1 << 2
    AES = 1 << 3
    PMULL = 1 << 4
    SHA1 = 1 << 5
    SHA2 = 1 << 6
    CRC32 = 1 << 7
    ATOMICS = 1 << 8
    FPHP = 1 << 9
    ASIMDHP = 1 << 10
    CPUID = 1 << 11
    ASIMDRDM = 1 << 12
    JSCVT = 1 << 13
    FCMA = 1 << 14
    LRCPC = 1 << 15
    DCPOP = 1 << 16
    SHA3 = 1 << 17
    SM3 = 1 << 18
    SM4 = 1 << 19
    ASIMDDP = 1 << 20
    SHA512 = 1 << 21
    SVE = 1 << 22
    ASIMDFHM = 1 << 23
    DIT = 1 << 24
    USCAT = 1 << 25
    ILRCPC = 1 << 26
    FLAGM = 1 << 27
    SSBS = 1 << 28
    SB = 1 << 29
    PACA = 1 << 30
    PACG = 1 << 31
    GCS = 1 << 32
    CMPBR = 1 << 33
    FPRCVT = 1 << 34
    F8MM8 = 1 << 35
    F8MM4 = 1 << 36
    SVE_F16MM = 1 << 37
    SVE_ELTPERM = 1 << 38
    SVE_AES2 = 1 << 39
    SVE_BFSCALE = 1 << 40
    SVE2P2 = 1 << 41
    SME2P2 = 1 << 42
    SME_SBITPERM = 1 << 43
    SME_AES = 1 << 44
    SME_SFEXPA = 1 << 45
    SME_STMOP = 1 << 46
    SME_SMOP4 = 1 << 47


class Hwcap2Aarch64(IntFlag):  # HWCAP2_*, for AT_HWCAP2
    DCPODP = 1 << 0
    SVE2 = 1 << 1
    SVEAES = 1 << 2
    SVEPMULL = 1 << 3
    SVEBITPERM = 1 << 4
    SVESHA3 = 1 << 5
    SVESM4 = 1 << 6
    FLAGM2 = 1 << 7
    FRINT = 1 << 8
    SVEI8MM = 1 << 9
    SVEF32MM = 1 << 10
    SVEF64MM = 1 << 11
    SVEBF16 = 1 << 12
    I8MM = 1 << 13
    BF16 = 1 << 14
    DGH = 1 << 15
    RNG = 1 << 16
    BTI = 1 << 17
    MTE = 1 << 18
    ECV = 1 << 19
    AFP = 1 << 20
    RPRES = 1 << 21
    MTE3 = 1 << 22
    SME = 1 << 23
    SME_I16I64 = 1 << 24
    SME_F64F64 = 1 << 25
    SME_I8I32 = 1 << 26
    SME_F16F32 = 1 << 27
    SME_B16F32 = 1 << 28
    SME_F32F32 = 1 << 29
    SME_FA64 = 1 << 30
    WFXT = 1 << 31
    EBF16 = 1 << 32
    SVE_EBF16 = 1 << 33
    CSSC = 1 << 34
    RPRFM = 1 << 35
    SVE2P1 = 1 << 36
    SME2 = 1 << 37
    SME2P1 = 1 << 38
    SME_I16I32 = 1 << 39
    SME_BI32I32 = 1 << 40
    SME_B16B16 = 1 << 41
    SME_F16F16 = 1 << 42
    MOPS = 1 << 43
    HBC = 1 << 44
    SVE_B16B16 = 1 << 45
    LRCPC3 = 1 << 46
    LSE128 = 1 << 47
    FPMR = 1 << 48
    LUT = 1 << 49
    FAMINMAX = 1 << 50
    F8CVT = 1 << 51
    F8FMA = 1 << 52
    F8DP4 = 1 << 53
    F8DP2 = 1 << 54
    F8E4M3 = 1 << 55
    F8E5M2 = 1 << 56
    SME_LUTV2 = 1 << 57
    SME_F8F16 = 1 << 58
    SME_F8F32 = 1 << 59
    SME_SF8FMA = 1 << 60
    SME_SF8DP4 = 1 << 61
    SME_SF8DP2 = 1 << 62
    POE = 1 << 63
