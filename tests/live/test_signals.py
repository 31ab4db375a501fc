"""The signal return path (`trace --signals`), against what the handler saw
(sigs.c): 25 SIGUSR1 deliveries on x86_64 and on i386 with and without
SA_RESTORER, and a forged rt_sigreturn on x86_64."""
from __future__ import annotations

import pytest

import targets as T

pytestmark = [
    pytest.mark.live,

]

SIGUSR1 = 10


def _via_is(via: object, restorer: int, names: tuple[str, ...]) -> bool:
    if not isinstance(via, str):
        return False
    if via.startswith("0x") and T.addr(via) == restorer:
        return True
    return any(n in via for n in names)


def _check(run: T.Run, via_names: tuple[str, ...], restorer_symbol: str | None,
           forged: bool = False) -> None:
    pid = run.proc.pid
    deliveries = [r for r in run.record if r["kind"] == "delivery"]
    summary = [r for r in run.record if r["kind"] == "summary"][0]
    assert summary["delivered"] == summary["sent"] == len(deliveries) == 25, summary
    tid = summary["tid"]
    sig_evs = [e for e in run.events if e["event"] == "signal" and e["pid"] == pid]
    ret_evs = [e for e in run.events if e["event"] == "sigreturn" and e["pid"] == pid]
    err = f"tracer stderr:\n{run.trace.stderr()}"
    assert len(sig_evs) == 25, f"{len(sig_evs)} signal events, 25 deliveries; {err}"
    assert len(ret_evs) == 25 + forged, f"{len(ret_evs)} sigreturn events; {err}"
    for i, (ev, rec) in enumerate(zip(sig_evs, deliveries)):
        assert ev["tid"] == tid, (i, ev)
        assert ev["signo"] == SIGUSR1 and ev["signame"] == "SIGUSR1", (i, ev)
        assert T.addr(ev["handler"]) == T.addr(rec["handler"]), (i, ev, rec)
        assert T.addr(ev["restorer"]) == T.addr(rec["restorer"]), (i, ev, rec)
        if restorer_symbol is not None:
            assert str(ev.get("restorer_symbol") or "").endswith(restorer_symbol), (i, ev)
    for i, (ev, rec) in enumerate(zip(ret_evs, deliveries)):
        assert ev["tid"] == tid, (i, ev)
        assert T.addr(ev["resume_ip"]) == T.addr(rec["interrupted_ip"]), (i, ev, rec)
        assert ev["signo"] == SIGUSR1, (i, ev)
        assert ev["anomaly"] is None, (i, ev)
        assert _via_is(ev["via"], T.addr(rec["restorer"]), via_names), (i, ev, rec)
    if forged:
        forge = [r for r in run.record if r["kind"] == "forge"][0]
        assert forge["reached"] is True, forge
        ev = ret_evs[-1]
        assert ev["tid"] == tid, ev
        assert isinstance(ev["anomaly"], str) and ev["anomaly"], ev
        assert T.addr(ev["resume_ip"]) == T.addr(forge["resume_ip"]), (ev, forge)
        assert ev["signo"] is None, ev


def test_signals_x86_64(target_bin, tmp_path):
    run = T.run_traced(target_bin("sigs"), tmp_path, [], ["--signals"])
    # x86_64 has no vDSO restorer: glibc's __restore_rt (a local symbol).
    _check(run, ("__restore_rt",), None)


@pytest.mark.i386
@pytest.mark.parametrize("variant", ["libc", "--raw-norestorer"])
def test_signals_i386_vdso_restorer(target_bin, tmp_path, variant):
    """No SA_RESTORER (glibc 2.36 on i386 sets none either): the kernel returns
    the handler into the vDSO's __kernel_rt_sigreturn."""
    args = [] if variant == "libc" else [variant]
    run = T.run_traced(target_bin("sigs", m32=True), tmp_path, args, ["--signals"])
    _check(run, ("__kernel_rt_sigreturn",), "__kernel_rt_sigreturn")
    for ev in (e for e in run.events if e["event"] == "sigreturn"):
        assert isinstance(ev["via"], str) and ev["via"].endswith("__kernel_rt_sigreturn"), ev


@pytest.mark.i386
def test_signals_i386_own_restorer(target_bin, tmp_path):
    """SA_RESTORER with the target's own restorer (int $0x80 rt_sigreturn)."""
    run = T.run_traced(target_bin("sigs", m32=True), tmp_path, ["--raw-restorer"], ["--signals"])
    _check(run, ("target_rt_restorer",), None)


def test_forged_sigreturn_x86_64(target_bin, tmp_path):
    run = T.run_traced(target_bin("sigs"), tmp_path, ["--forge"], ["--signals"])
    _check(run, ("__restore_rt",), None, forged=True)
