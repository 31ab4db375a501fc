"""A Python program reading the clock the way most code does: time.time() and
time.monotonic() go straight to the vDSO (clock_gettime), so strace shows nothing.

    python3 examples/python_time.py &
    vdsotrace trace -p $! --duration 2
"""
import time

deadline = time.monotonic() + 5
n = 0
while time.monotonic() < deadline:
    time.time()
    n += 1
    time.sleep(0.05)
print(f"python_time: {n} rounds")
