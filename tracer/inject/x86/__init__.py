"""The in-tracee recorder's x86 code: the planner that reads an x86_64 or i386 vDSO (plan.py),
the emitter (asm.py) and the code page builders (stubs64.py for x86_64, stubs32.py for i386).
Everything here is x86; tracer/inject/__init__.py drives it."""
