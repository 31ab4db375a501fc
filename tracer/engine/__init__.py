"""The engine, split by concern (control.py: the typed interface the console talks to)."""
