"""Key bindings: one factory, a docstring per handler."""
from __future__ import annotations

from prompt_toolkit.buffer import CompletionState
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from tracer.console.commands import Console
from tracer.errors import TracerError

__all__ = ["console_bindings"]


def console_bindings(console: Console) -> KeyBindings:
    kb = KeyBindings()

    @kb.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        """Ctrl-C: pause the tracee if it runs; otherwise drop the line being typed, like a
        shell. Never ends the console or the tracee."""
        if console.state.run_state == "running" and console.state.attached:
            try:
                console.pause()
            except TracerError as e:
                console.write(f"error: {e}")
        else:
            event.current_buffer.reset()

    @kb.add("tab")
    def _complete(event: KeyPressEvent) -> None:
        """Tab: complete now, synchronously (so keys typed right after it see the result). One
        candidate: insert it. Several: insert the first (the most used) and open the menu,
        where Tab again goes to the next."""
        b = event.current_buffer
        if b.complete_state is not None:
            b.complete_next()
            return
        if b.completer is None:
            return
        comps = list(b.completer.get_completions(b.document,
                                                 CompleteEvent(completion_requested=True)))
        if not comps:
            return
        if len(comps) == 1:
            b.apply_completion(comps[0])
            return
        b.complete_state = CompletionState(original_document=b.document, completions=comps)
        b.go_to_completion(0)

    @kb.add("s-tab")
    def _complete_back(event: KeyPressEvent) -> None:
        """Shift-Tab: the previous completion in the open menu."""
        b = event.current_buffer
        if b.complete_state is not None:
            b.complete_previous()

    return kb
