"""Renderers: data -> text lines, JSON lines, tables. The only place addresses get formatted."""
