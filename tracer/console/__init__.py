"""The interactive console (prompt_toolkit: the only package that imports it).

`app.run_console` is the entry point; `commands.Console` is the dispatcher, usable without a
terminal (its command table in `specs`, the event stream in `stream`, the inspection commands
in `inspection`); `state.ConsoleState` is what the toolbar and prompt are built from. The
engine is reached only through tracer.engine.control.Control.
"""
