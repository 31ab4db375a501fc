"""The engine, one module per job; tracer.session.Session combines them."""
