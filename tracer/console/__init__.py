"""The interactive console (prompt_toolkit: the only package that imports it).

`app.run_console` is the entry point; `commands.Console` is the dispatcher, usable without a
terminal; `state.ConsoleState` is what the toolbar and prompt are built from.
"""
