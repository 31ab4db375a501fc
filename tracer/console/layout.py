"""Pure builders: console state in, formatted text out. No I/O, no engine calls (the pump
thread keeps the numbers in `ConsoleState` fresh)."""
from __future__ import annotations

from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.styles import Style

from tracer.console.state import ConsoleState

__all__ = ["toolbar", "prompt_message", "console_style"]


def _rate(r: float) -> str:
    return f"{r / 1000:.1f}k" if r >= 10_000 else f"{r:.0f}"


def toolbar(st: ConsoleState) -> FormattedText:
    """The bottom line: pid, ABI, running or paused, threads, calls per second, fallbacks."""
    if st.pid is None:
        return FormattedText([("class:toolbar", " not attached: `attach PID` (Tab lists "
                               "processes), `help` for the commands ")])
    parts: list[tuple[str, str]] = [("class:toolbar.pid", f" pid {st.pid} "),
                                    ("class:toolbar", f"{st.comm} ")]
    if st.abi:
        parts.append(("class:toolbar", f"| {st.abi} "))
    state = st.run_state if st.attached or st.run_state == "exited" else "detached"
    if st.run_state == "exited" and st.exit_status:
        state = f"exited ({st.exit_status})"
    parts.append(("class:toolbar", "| "))
    parts.append((f"class:toolbar.{st.run_state}", state))
    if st.attached:
        parts.append(("class:toolbar", f" | {st.threads} thread{'s' if st.threads != 1 else ''}"
                      f" | {_rate(st.rate)} calls/s | {st.calls} calls | "))
        parts.append(("class:toolbar.fallbacks" if st.fallbacks else "class:toolbar",
                      f"{st.fallbacks} fallback{'s' if st.fallbacks != 1 else ''}"))
        parts.append(("class:toolbar", f" | break: {','.join(st.breaks) or 'none'}"))
    if st.filter.active:
        parts.append(("class:toolbar", f" | filter: {st.filter.describe()}"))
    parts.append(("class:toolbar", " "))
    return FormattedText(parts)


def prompt_message(st: ConsoleState) -> FormattedText:
    label = f"vdsotrace {st.pid}" if st.attached else "vdsotrace"
    return FormattedText([("class:prompt", f"({label}) ")])


def console_style() -> Style:
    """Colours of the prompt and toolbar; prompt_toolkit drops them itself under NO_COLOR."""
    return Style.from_dict({
        "bottom-toolbar": "noreverse bg:#303030 #d0d0d0",
        "toolbar": "",
        "toolbar.pid": "bold",
        "toolbar.running": "bold #5fd75f",
        "toolbar.paused": "bold #ffd75f",
        "toolbar.exited": "bold #ff5f5f",
        "toolbar.detached": "#a0a0a0",
        "toolbar.fallbacks": "bold #ffd75f",
        "prompt": "bold #5fafff",
    })
