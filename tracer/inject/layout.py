"""The shared memory the stubs and the tracer agree on: the ring's header and slot layout, the
stub's stack frame, and the code page's data words. All little-endian; the ring is the same
for x86_64 and i386 tracees (i386 stubs write their 32-bit words zero-extended)."""
from __future__ import annotations

__all__ = [
    "HEAD", "TAIL", "LOST", "DATA", "SLOT", "SLOT_SHIFT", "NSLOTS", "RING_SIZE",
    "S_SEQ", "S_TID", "S_FID", "S_FLAGS", "S_ARGS", "S_RET", "S_T0", "S_T1", "S_CALLER",
    "S_OUT", "OUT_MAX", "NOUTS", "MAX_ARGS", "F_FALLBACK", "F_OUT0",
    "FR_ARGS", "FR_KEYA", "FR_KEYB", "FR_FLAG", "FR_T0", "FR_RET", "FRAME",
    "CODE_RINGPTR", "CODE_HEARTBEAT", "CODE_PATIENCE", "WAIT_SPINS", "WAIT_SLEEP_NS", "CODE_START", "CODE_SIZE", "SLOT_FORMAT",
    "FR32_OUTARGS", "FR32_ARGS", "FR32_KEYA", "FR32_KEYB", "FR32_FLAG", "FR32_T0", "FR32_RET",
    "FR32_TID", "FR32_T1", "FR32_SAVE", "FRAME32",
    "FRA_LR", "FRA_TID", "FRA_T1", "FRAME_A64", "CODE_KEYA", "CODE_KEYB",
]

# Ring header: the producers' index, the consumer's index and the lost counter on separate
# cache lines (the stubs write HEAD and LOST, only the tracer writes TAIL).
HEAD = 0
TAIL = 64
LOST = 128
DATA = 4096
SLOT_SHIFT = 7
SLOT = 1 << SLOT_SHIFT
NSLOTS = 1 << 16                    # a power of two: slot = index & (NSLOTS - 1)
RING_SIZE = DATA + NSLOTS * SLOT

# One slot. `seq` is written last (x86 stores are not reordered with other stores), as
# index + 1: a slot whose seq is not its index + 1 is not committed yet.
S_SEQ = 0        # u64
S_TID = 8        # u32
S_FID = 12       # u16: index into the Recorder's function list
S_FLAGS = 14     # u16: F_FALLBACK, F_OUT0 << k for each out copied
S_ARGS = 16      # 6 x u64: rdi rsi rdx rcx r8 r9 at entry
S_RET = 64       # u64: rax at exit
S_T0 = 72        # u64: TSC at entry
S_T1 = 80        # u64: TSC at exit
S_CALLER = 88    # u64: the return address
S_OUT = 96       # NOUTS x OUT_MAX bytes: what the call wrote behind its out pointers
OUT_MAX = 16
NOUTS = 2
MAX_ARGS = 6
F_FALLBACK = 1
F_OUT0 = 2
SLOT_FORMAT = "<QIHH6QQQQQ16s16s"    # struct layout of one slot (128 bytes)

# The stub's frame, below the caller's return address ([rsp+FRAME] once the stub has made it).
# FRAME is 8 mod 16 so the copied body is entered with the ABI's stack alignment.
FR_ARGS = 0      # 6 x u64
FR_KEYA = 48     # two words that mark a live frame for the fallback stubs' scan
FR_KEYB = 56
FR_FLAG = 64     # set to 1 by a fallback stub
FR_T0 = 72
FR_RET = 80
FRAME = 88

# The i386 stub's frame (cdecl: the caller's arguments lie above its return address, at
# [esp+FRAME32+4+4k]). FRAME32 is 12 mod 16: the stub is entered with esp = 12 mod 16 (i386
# psABI: 16-byte aligned at the call), so the copy is entered the same way.
FR32_OUTARGS = 0  # 6 x u32: the arguments the copy gets (it may write its own)
FR32_ARGS = 24    # 6 x u32: the arguments as the caller passed them
FR32_KEYA = 48    # the two key words (u32), then the flag word, as on x86_64: flag = key + 8
FR32_KEYB = 52
FR32_FLAG = 56
FR32_T0 = 60      # u64
FR32_RET = 68     # u32: eax at exit
FR32_TID = 72
FR32_T1 = 76      # u64
FR32_SAVE = 84    # ebx, esi, edi (callee-saved in cdecl; the ring code uses them)
FRAME32 = 108

# The code page's data words (the tracer writes them through its descriptor of the memfd).
# RINGPTR: the ring's address; the tracer clears it to switch every stub's recording off.
# HEARTBEAT: the TSC when the tracer last showed it was draining (0: never, as with --lossy).
# PATIENCE: how many TSC ticks of silence (~100 ms) a stub facing a full ring waits for the
# tracer before it counts the call as lost instead: a stub waits for room only while
# rdtsc - HEARTBEAT <= PATIENCE (signed), so a tracer killed, stopped or stuck on a
# terminal slows its tracee for 100 ms at most, never hangs it.
CODE_RINGPTR = 0
CODE_HEARTBEAT = 8
CODE_PATIENCE = 16
WAIT_SPINS = 128         # `pause` rounds a waiting stub spins between two sleeps
WAIT_SLEEP_NS = 20000    # and the nanosleep between two spins
CODE_START = 64
CODE_SIZE = 4 * 4096

# arm64 (tracer/inject/aarch64/stubs.py): the stub's frame at its sp (FRAME_A64, a multiple of
# 16: sp stays 16-byte aligned, AAPCS64); the words up to FR_RET are where x86_64 has them, so
# a fallback stub flags FR_FLAG = the key words + 16 on both.
FRA_LR = 88       # x30 at entry: the caller's return address (unsigned)
FRA_TID = 96
FRA_T1 = 104
FRAME_A64 = 112
# the code page's two key words (arm64 stubs load them pc-relative: 64-bit, not immediates)
CODE_KEYA = 24
CODE_KEYB = 32
