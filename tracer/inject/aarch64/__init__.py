"""--inject for arm64 tracees: the plan (what to copy and redirect), the code page's stubs."""
